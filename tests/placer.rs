//! The placer library: consistent-hash placement exactly as defined
//! (SipHash-2-4 with Fn's keys, then jump consistent hash), and the
//! placement loop's rules against scripted runners.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fnrunner::call::CallOptions;
use fnrunner::guest::full_body;
use fnrunner::placer::*;
use fnrunner::runner::RunnerStatus;
use futures::future::BoxFuture;

/// (function id, runners, SipHash-2-4 key, first runner), computed by
/// tests/data/ch_vectors.py, an independent implementation checked against
/// the SipHash paper's vectors.
const VECTORS: &[(&str, usize, u64, usize)] = &[
    (r#"hello"#, 1, 0x5868f78376cd7df3, 0),
    (r#"echo"#, 1, 0xaa551626f17e29a4, 0),
    (r#"counter"#, 1, 0x9c3289bf4e6203d8, 0),
    (r#"bench-0"#, 1, 0x1b5adbb2753af51b, 0),
    (r#"bench-1"#, 1, 0x23ecd01f407c08aa, 0),
    (r#"app/route"#, 1, 0xceaa58b1a5f9cec4, 0),
    (r#"a"#, 1, 0x604b22e2a73bf95d, 0),
    (r#""#, 1, 0x4dccf8f6e62ea9ad, 0),
    (
        r#"fn-with-a-rather-long-name-0123456789"#,
        1,
        0x8d9604529bcedf53,
        0,
    ),
    (r#"ünïcode"#, 1, 0x0eafcbcab9659ef5, 0),
    (r#"hello"#, 2, 0x5868f78376cd7df3, 1),
    (r#"echo"#, 2, 0xaa551626f17e29a4, 1),
    (r#"counter"#, 2, 0x9c3289bf4e6203d8, 0),
    (r#"bench-0"#, 2, 0x1b5adbb2753af51b, 1),
    (r#"bench-1"#, 2, 0x23ecd01f407c08aa, 0),
    (r#"app/route"#, 2, 0xceaa58b1a5f9cec4, 1),
    (r#"a"#, 2, 0x604b22e2a73bf95d, 1),
    (r#""#, 2, 0x4dccf8f6e62ea9ad, 1),
    (
        r#"fn-with-a-rather-long-name-0123456789"#,
        2,
        0x8d9604529bcedf53,
        1,
    ),
    (r#"ünïcode"#, 2, 0x0eafcbcab9659ef5, 1),
    (r#"hello"#, 3, 0x5868f78376cd7df3, 1),
    (r#"echo"#, 3, 0xaa551626f17e29a4, 1),
    (r#"counter"#, 3, 0x9c3289bf4e6203d8, 2),
    (r#"bench-0"#, 3, 0x1b5adbb2753af51b, 1),
    (r#"bench-1"#, 3, 0x23ecd01f407c08aa, 0),
    (r#"app/route"#, 3, 0xceaa58b1a5f9cec4, 1),
    (r#"a"#, 3, 0x604b22e2a73bf95d, 1),
    (r#""#, 3, 0x4dccf8f6e62ea9ad, 2),
    (
        r#"fn-with-a-rather-long-name-0123456789"#,
        3,
        0x8d9604529bcedf53,
        1,
    ),
    (r#"ünïcode"#, 3, 0x0eafcbcab9659ef5, 1),
    (r#"hello"#, 5, 0x5868f78376cd7df3, 1),
    (r#"echo"#, 5, 0xaa551626f17e29a4, 1),
    (r#"counter"#, 5, 0x9c3289bf4e6203d8, 3),
    (r#"bench-0"#, 5, 0x1b5adbb2753af51b, 1),
    (r#"bench-1"#, 5, 0x23ecd01f407c08aa, 4),
    (r#"app/route"#, 5, 0xceaa58b1a5f9cec4, 1),
    (r#"a"#, 5, 0x604b22e2a73bf95d, 3),
    (r#""#, 5, 0x4dccf8f6e62ea9ad, 2),
    (
        r#"fn-with-a-rather-long-name-0123456789"#,
        5,
        0x8d9604529bcedf53,
        3,
    ),
    (r#"ünïcode"#, 5, 0x0eafcbcab9659ef5, 1),
    (r#"hello"#, 10, 0x5868f78376cd7df3, 1),
    (r#"echo"#, 10, 0xaa551626f17e29a4, 1),
    (r#"counter"#, 10, 0x9c3289bf4e6203d8, 3),
    (r#"bench-0"#, 10, 0x1b5adbb2753af51b, 1),
    (r#"bench-1"#, 10, 0x23ecd01f407c08aa, 9),
    (r#"app/route"#, 10, 0xceaa58b1a5f9cec4, 7),
    (r#"a"#, 10, 0x604b22e2a73bf95d, 8),
    (r#""#, 10, 0x4dccf8f6e62ea9ad, 6),
    (
        r#"fn-with-a-rather-long-name-0123456789"#,
        10,
        0x8d9604529bcedf53,
        3,
    ),
    (r#"ünïcode"#, 10, 0x0eafcbcab9659ef5, 1),
];

#[test]
fn consistent_hash_placement_matches_the_reference_vectors() {
    for &(function, runners, key, first) in VECTORS {
        assert_eq!(function_key(function), key, "SipHash-2-4 of {function:?}");
        assert_eq!(
            first_runner(function, runners),
            first,
            "{function:?} over {runners} runners"
        );
    }
}

/// What a scripted runner answers, in turn.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Take,
    Nack,
    Unreachable,
    FailAfterSending,
}

struct Scripted {
    name: String,
    answers: Mutex<Vec<Answer>>,
    offers: AtomicUsize,
    log: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    fn new(name: &str, answers: &[Answer], log: &Arc<Mutex<Vec<String>>>) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            answers: Mutex::new(answers.iter().rev().copied().collect()),
            offers: AtomicUsize::new(0),
            log: log.clone(),
        })
    }
}

impl Runner for Scripted {
    fn try_exec<'a>(&'a self, call: &'a PlacedCall) -> BoxFuture<'a, Result<Attempt, RunnerError>> {
        Box::pin(async move {
            self.offers.fetch_add(1, Ordering::SeqCst);
            self.log.lock().expect("log").push(self.name.clone());
            let answer = self
                .answers
                .lock()
                .expect("answers")
                .pop()
                .unwrap_or(Answer::Nack);
            match answer {
                Answer::Take => Ok(Attempt::Placed(http::Response::new(full_body(call.body.clone())))),
                Answer::Nack => Ok(Attempt::Nack {
                    reason: "busy".into(),
                }),
                Answer::Unreachable => Err(RunnerError::Unreachable {
                    address: self.name.clone(),
                    reason: "refused".into(),
                }),
                Answer::FailAfterSending => Err(RunnerError::Failed {
                    address: self.name.clone(),
                    reason: "reset".into(),
                }),
            }
        })
    }

    fn status(&self) -> BoxFuture<'_, Result<RunnerStatus, RunnerError>> {
        Box::pin(async move {
            Err(RunnerError::Unreachable {
                address: self.name.clone(),
                reason: "no status".into(),
            })
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async { Ok(()) })
    }

    fn address(&self) -> &str {
        &self.name
    }
}

fn call(function: &str, timeout: Option<Duration>) -> PlacedCall {
    PlacedCall {
        function: function.into(),
        method: http::Method::POST,
        path_and_query: "/".parse().expect("path"),
        headers: http::HeaderMap::new(),
        body: Bytes::from_static(b"the body"),
        options: CallOptions {
            call_id: None,
            timeout,
            detached: false,
        },
        created: Instant::now(),
    }
}

fn config() -> PlacerConfig {
    PlacerConfig {
        retry_all_delay: Duration::from_millis(10),
        placer_timeout: Duration::from_millis(300),
        detached_placer_timeout: Duration::from_millis(300),
    }
}

fn pool(runners: &[Arc<Scripted>]) -> StaticRunnerPool {
    StaticRunnerPool::new(runners.iter().map(|r| r.clone() as Arc<dyn Runner>).collect())
}

#[tokio::test]
async fn ch_walks_the_ring_from_the_hashed_runner_past_nacks_and_unreachable_runners() {
    let log = Arc::new(Mutex::new(Vec::new()));
    // "hello" over 3 runners starts at runner 1 (see the vectors).
    let runners = [
        Scripted::new("r0", &[Answer::Take], &log),
        Scripted::new("r1", &[Answer::Nack], &log),
        Scripted::new("r2", &[Answer::Unreachable], &log),
    ];
    let placement = ConsistentHashPlacer::new(config(), None)
        .place_call(&pool(&runners), &call("hello", None))
        .await
        .map_err(|e| e.to_string())
        .expect("placed");
    assert_eq!(placement.runner, "r0");
    assert_eq!(placement.attempts, 3);
    assert_eq!(*log.lock().expect("log"), ["r1", "r2", "r0"]);
}

#[tokio::test]
async fn a_failure_after_sending_is_never_retried() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let runners = [
        Scripted::new("r0", &[Answer::Take], &log),
        Scripted::new("r1", &[Answer::FailAfterSending], &log),
        Scripted::new("r2", &[Answer::Take], &log),
    ];
    let error = ConsistentHashPlacer::new(config(), None)
        .place_call(&pool(&runners), &call("hello", None))
        .await
        .err()
        .expect("not placed");
    assert!(
        matches!(error, PlaceError::Runner(RunnerError::Failed { .. })),
        "{error}"
    );
    assert_eq!(
        *log.lock().expect("log"),
        ["r1"],
        "no other runner was offered the call"
    );
}

#[tokio::test]
async fn after_a_full_pass_the_placer_waits_and_goes_round_again_until_its_timeout() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let runners = [
        Scripted::new("r0", &[Answer::Nack, Answer::Nack, Answer::Take], &log),
        Scripted::new("r1", &[], &log),
    ];
    let placement = NaivePlacer::new(config(), None)
        .place_call(&pool(&runners), &call("f", None))
        .await
        .map_err(|e| e.to_string())
        .expect("placed on the third pass");
    assert_eq!(placement.runner, "r0");
    // NB: the naive placer starts at a varying runner: three passes over
    // two runners are 5 offers from r0 (r0 r1 | r0 r1 | r0) or 6 from r1.
    let offers = log.lock().expect("log").clone();
    let expected: Vec<&str> = if offers.first().map(String::as_str) == Some("r0") {
        vec!["r0", "r1", "r0", "r1", "r0"]
    } else {
        vec!["r1", "r0", "r1", "r0", "r1", "r0"]
    };
    assert_eq!(offers, expected, "three round-robin passes over two runners");
    assert_eq!(placement.attempts, expected.len() as u64);

    let busy = [Scripted::new("r0", &[], &log), Scripted::new("r1", &[], &log)];
    let started = Instant::now();
    let error = NaivePlacer::new(config(), None)
        .place_call(&pool(&busy), &call("f", None))
        .await
        .err()
        .expect("no taker");
    assert!(matches!(error, PlaceError::NoTaker(..)), "{error}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "it kept trying until the placer timeout"
    );
    let offers = busy[0].offers.load(Ordering::SeqCst) + busy[1].offers.load(Ordering::SeqCst);
    assert!(offers >= 10, "many passes, {offers} offers");
}

#[tokio::test]
async fn the_calls_own_deadline_stops_placement_first() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let busy = [Scripted::new("r0", &[], &log)];
    let started = Instant::now();
    let error = NaivePlacer::new(config(), None)
        .place_call(&pool(&busy), &call("f", Some(Duration::from_millis(50))))
        .await
        .err()
        .expect("no taker");
    assert!(
        matches!(error, PlaceError::NoTaker(limit, _) if limit <= Duration::from_millis(50)),
        "{error}"
    );
    assert!(
        started.elapsed() < config().placer_timeout,
        "stopped before the placer's own timeout"
    );
}

#[tokio::test]
async fn naive_placement_goes_round_robin() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let runners: Vec<Arc<Scripted>> = (0..3)
        .map(|i| Scripted::new(&format!("r{i}"), &[Answer::Take; 10], &log))
        .collect();
    let placer = NaivePlacer::new(config(), None);
    let pool = pool(&runners);
    let mut placed = Vec::new();
    for _ in 0..6 {
        let placement = placer
            .place_call(&pool, &call("f", None))
            .await
            .map_err(|e| e.to_string())
            .expect("placed");
        placed.push(placement.runner);
    }
    for pair in placed.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "consecutive calls go to the next runner: {placed:?}"
        );
    }
    assert_eq!(placed[0], placed[3]);
}
