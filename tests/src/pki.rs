//! Certificates for TLS tests.

use std::path::PathBuf;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Makes them; `server_expired`: the server certificate expired in
    /// 2021.
    pub fn new(server_expired: bool) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "catga test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, &ca_key);
        let write = |name: &str, pem: String| {
            std::fs::write(dir.path().join(name), pem).expect("write pem");
        };
        write("ca.pem", ca_cert.pem());

        let server_key = KeyPair::generate().expect("key");
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("params");
        if server_expired {
            server_params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            server_params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server cert");
        write("server.pem", server_cert.pem());
        write("server-key.pem", server_key.serialize_pem());

        let client_key = KeyPair::generate().expect("key");
        let mut client_params = CertificateParams::new(vec!["client".to_owned()]).expect("params");
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &issuer)
            .expect("client cert");
        write("client.pem", client_cert.pem());
        write("client-key.pem", client_key.serialize_pem());
        Pki { dir }
    }

    /// The file `name`: `ca.pem`, `server.pem`, `server-key.pem`,
    /// `client.pem`, `client-key.pem`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
