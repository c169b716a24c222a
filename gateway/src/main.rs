use anyhow::Context;
use gateway::{Config, Gateway};

/// Every open connection is a tokio task plus two socket registrations, each allocated with
/// 128-byte alignment; jemalloc serves those from its size classes where glibc pads each one
/// (1.87 vs 2.26 KiB per idle connection measured, same CPU per request; BENCHMARKS.md).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_args();
    process_shell::logging::init_logging(&config.log, "info");
    raise_fd_limit();
    process_shell::logging::log_start("gateway", &config);
    let mut term =
        process_shell::TerminationSignal::install().context("installing the SIGTERM handler")?;
    let gateway = Gateway::start(config)
        .await
        .context("gateway failed to start")?;
    term.recv().await;
    gateway.begin_termination();
    gateway.wait().await;
    Ok(())
}

/// Each spliced connection holds two sockets and up to two pipes: lift the soft descriptor
/// limit to the hard one so thousands of connections fit.
#[allow(unsafe_code)] // getrlimit/setrlimit have no safe wrapper in std
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
