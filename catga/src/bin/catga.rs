//! The operator CLI: `catga help`. See [`catga::cli`].
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match catga::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("catga: {e}");
            std::process::exit(2);
        }
    };
    match catga::cli::run(&args, config).await {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("catga: {e}");
            std::process::exit(if e.kind() == catga::ErrorKind::Invalid {
                2
            } else {
                1
            });
        }
    }
}
