//! docker/ without a docker engine: `scripts/check-docker` parses docker/compose.yml and
//! docker/Dockerfile and checks them against the local stack (the same schema files
//! from sql/, the same ports, RF 3 and min.insync.replicas 2, a non-root runtime).

use std::process::Command;

#[test]
fn compose_file_and_dockerfile_match_the_local_stack() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(repo.join("scripts/check-docker"))
        .output()
        .expect("scripts/check-docker runs (it needs python3 with the yaml module)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "scripts/check-docker failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("check-docker: all checks passed"),
        "{stdout}"
    );
}
