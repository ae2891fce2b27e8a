use clap::Parser as _;
use lb_userspace::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    lb_userspace::cli::init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => lb_userspace::cli::run::main(args),
        Command::Demo(args) => lb_userspace::cli::demo::main(args),
        Command::Status(args) => lb_userspace::cli::status::main(args),
        Command::Plan(args) => lb_userspace::cli::plan::main(args),
        Command::Get(args) => lb_userspace::cli::get::main(args),
        Command::Explain(args) => lb_userspace::cli::explain::main(args),
        Command::Uninstall(args) => lb_userspace::cli::uninstall::main(args),
        Command::LogLevel(args) => lb_userspace::cli::log_level::main(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("switchboard: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
