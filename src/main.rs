//! The `ftpx` binary: parses the command line, sets up logging and hands
//! each subcommand to the library. Errors end here as one line on standard
//! error and a non-zero exit status.

use std::process::ExitCode;

use clap::Parser;

use ftpx::cli::{Cli, Command};
use ftpx::client::shell;
use ftpx::{admin, logging, operator};

#[global_allocator]
static ALLOCATOR: ftpx::alloc::Allocator = ftpx::alloc::Allocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ftpx: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Admin commands reach a cluster's database from this thread.
    let _runtime = runtime.enter();
    let result = match cli.command {
        Command::Serve { listen, config } => {
            runtime.block_on(admin::serve(config.config.as_deref(), listen))
        }
        Command::Connect(args) => {
            logging::init_client();
            return ExitCode::from(runtime.block_on(shell::run(args)));
        }
        Command::GenCert { dir, hosts, force } => admin::gen_cert(&dir, hosts, force),
        Command::Useradd {
            name,
            quota,
            max_files,
            password_stdin,
            config,
        } => admin::useradd(
            config.config.as_deref(),
            &name,
            quota.as_deref(),
            max_files,
            password_stdin,
        ),
        Command::Userdel {
            name,
            remove_home,
            config,
        } => admin::userdel(config.config.as_deref(), &name, remove_home),
        Command::Usermod {
            name,
            quota,
            max_files,
            password_stdin,
            password,
            config,
        } => admin::usermod(
            config.config.as_deref(),
            &name,
            quota.as_deref(),
            max_files,
            password_stdin || password,
            password_stdin,
        ),
        Command::Users { config } => admin::users(config.config.as_deref()),
        Command::ImportUsers { file, config } => {
            admin::import_users(config.config.as_deref(), &file)
        }
        Command::Status { json, config } => {
            runtime.block_on(operator::status(config.config.as_deref(), json))
        }
        Command::Kick { user, config } => {
            runtime.block_on(operator::kick(config.config.as_deref(), &user))
        }
        Command::Completions { shell } => admin::completions(shell),
        Command::Man { dir } => admin::man(dir.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftpx: {e}");
            ExitCode::FAILURE
        }
    }
}
