//! Puts the git revision into the build, for `mtls_edge_build_info` (`MTLS_EDGE_REVISION` in the
//! environment wins: an image built without `.git` passes it as a build argument).
fn main() {
    println!("cargo:rerun-if-env-changed=MTLS_EDGE_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    let revision = std::env::var("MTLS_EDGE_REVISION").ok().or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    println!(
        "cargo:rustc-env=MTLS_EDGE_REVISION={}",
        revision.unwrap_or_else(|| "unknown".into())
    );
}
