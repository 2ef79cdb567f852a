//! The operator CLI: `catga help`. See [`catga::cli`].
#![forbid(unsafe_code)]

use std::io::Write as _;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match catga::Config::from_env() {
        Ok(c) => c,
        Err(e) => fail(2, &e.to_string()),
    };
    // Without CATGA_SERVICE the service would be named after this binary:
    // a command on one service's data must name it.
    let per_service = args
        .iter()
        .any(|a| matches!(a.as_str(), "dlq" | "sagas" | "outbox" | "delayed" | "schema"));
    let named = std::env::var_os("CATGA_SERVICE").is_some()
        || args
            .iter()
            .any(|a| a == "--service" || a.starts_with("--service="));
    if per_service && !named {
        fail(2, "name the service: set CATGA_SERVICE or pass --service NAME");
    }
    match catga::cli::run(&args, config).await {
        // A closed pipe (`catga dlq list | head`) ends the output quietly.
        Ok(out) => {
            let _ = std::io::stdout().write_all(out.as_bytes());
        }
        Err(e) if e.kind() == catga::ErrorKind::Invalid => fail(2, &e.to_string()),
        Err(e) => fail(1, &e.to_string()),
    }
}

fn fail(code: i32, why: &str) -> ! {
    eprintln!("catga: {why}");
    std::process::exit(code);
}
