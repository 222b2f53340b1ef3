//! Access-log rotation: move the file away, SIGHUP, and ferry writes to a new one.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_access_log_file() {
    let echo = echo_server().await;
    let config = echo_config("", echo);
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("front");

    let mut first = connect(addr).await;
    echo_round_trip(&mut first, b"before").await;
    drop(first);
    assert_eq!(ferry.records(1, WAIT).await.len(), 1);

    // Rotate: the old file moves away; the reload opens a new one at the configured path.
    let rotated = ferry.dir.path().join("access.log.1");
    std::fs::rename(&ferry.log_path, &rotated).expect("rotate");
    ferry.signal("HUP");
    ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("reload: nothing changed"))
        .await
        .expect("reload logged");

    let mut second = connect(addr).await;
    echo_round_trip(&mut second, b"after").await;
    drop(second);
    let new = ferry.records(1, WAIT).await;
    assert_eq!(new.len(), 1, "the new file holds the new record only");
    assert_eq!(new[0]["bytes_up"], 5);
    let old = parse_records(
        &std::fs::read_to_string(&rotated)
            .expect("rotated file")
            .lines()
            .map(String::from)
            .collect::<Vec<_>>(),
    );
    assert_eq!(old.len(), 1, "the rotated file keeps the old record only");
    assert_eq!(old[0]["bytes_up"], 6);
}
