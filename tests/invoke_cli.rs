//! `fnrunner invoke` through the real binary: output, exit codes, timings,
//! and one clear line for every kind of bad input.

mod common;

use common::*;

fn store() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn fixture_arg(name: &str) -> String {
    fixture(name).display().to_string()
}

#[test]
fn invoke_prints_a_component_response_body_for_get_and_post() {
    let dir = store();
    let out = invoke(
        dir.path(),
        &[&fixture_arg("hello"), "--path", "/a/b?c=d", "-H", "x-test: t1"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "hello from fnrunner\npath=/a/b\nquery=c=d\nx-test=t1\n"
    );
    let out = invoke(dir.path(), &[&fixture_arg("hello"), "-d", "some data"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "some data");
}

#[test]
fn invoke_reads_the_body_from_a_file_and_from_stdin() {
    let dir = store();
    let file = dir.path().join("body.txt");
    std::fs::write(&file, "from a file").expect("write");
    let out = invoke(
        dir.path(),
        &[&fixture_arg("echo"), "-d", &format!("@{}", file.display())],
    );
    assert_eq!(stdout(&out), "from a file");
    let mut child = fnrunner()
        .args(["invoke", "--store-dir"])
        .arg(dir.path())
        .args([&fixture_arg("echo"), "-X", "POST"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"from stdin").expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(stdout(&out), "from stdin");
}

#[test]
fn invoke_dir_name_target_uses_the_settings_beside_the_module() {
    let dir = store();
    let target = common::repo().join("fixtures/functions/loop");
    let out = invoke(dir.path(), &[target.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(3), "timeout exit code");
    assert!(
        stderr(&out).contains("function `loop` timed out after 500 ms"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn verbose_shows_status_headers_call_id_slot_hash_and_phase_timings() {
    let dir = store();
    let out = invoke(
        dir.path(),
        &[
            &fixture_arg("headers"),
            "-v",
            "--path",
            "/p?status=201",
            "-H",
            "x-foo: bar",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let err = stderr(&out);
    for needle in [
        "< 201 Created",
        "< x-cgi-method: GET",
        "* call id:",
        "* slot hash:",
        "* load:",
        "(compiled)",
        "* instantiate:",
        "* user execution:",
        "* total:",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let call_id = err
        .lines()
        .find_map(|l| l.strip_prefix("* call id:"))
        .map(str::trim)
        .expect("call id line");
    assert!(stdout(&out).contains(&format!("FN_CALL_ID={call_id}")));
    // The second run loads the compiled module from the store.
    let again = invoke(dir.path(), &[&fixture_arg("headers"), "-v"]);
    assert!(
        stderr(&again).contains("(from the module store)"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn repeat_shows_the_cold_call_apart_from_the_warm_ones() {
    let dir = store();
    let out = invoke(dir.path(), &[&fixture_arg("hello-min"), "--repeat", "20"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "hello\n", "the body is printed once");
    let err = stderr(&out);
    assert!(err.contains("cold: "), "{err}");
    assert!(err.contains("warm: 19 calls"), "{err}");
}

#[test]
fn exit_codes_tell_guest_errors_timeouts_traps_and_limits_apart() {
    let dir = store();
    let ok = invoke(dir.path(), &[&fixture_arg("headers"), "--path", "/?status=302"]);
    assert_eq!(ok.status.code(), Some(0), "3xx is success");
    let guest_error = invoke(dir.path(), &[&fixture_arg("headers"), "--path", "/?status=404"]);
    assert_eq!(guest_error.status.code(), Some(1), "the guest's own 4xx");
    let timeout = invoke(dir.path(), &[&fixture_arg("loop"), "--timeout-ms", "200"]);
    assert_eq!(timeout.status.code(), Some(3));
    assert!(
        stderr(&timeout).contains("timed out after 200 ms"),
        "{}",
        stderr(&timeout)
    );
    let trap = invoke(dir.path(), &[&fixture_arg("trap")]);
    assert_eq!(trap.status.code(), Some(4));
    assert!(
        stderr(&trap).contains("error: function `trap` trapped"),
        "{}",
        stderr(&trap)
    );
    let bomb = invoke(dir.path(), &[&fixture_arg("membomb"), "--memory-mb", "8"]);
    assert_eq!(bomb.status.code(), Some(4));
    assert!(
        stderr(&bomb).contains("exceeded its memory limit of 8 MiB"),
        "{}",
        stderr(&bomb)
    );
    let too_big = invoke(dir.path(), &[&fixture_arg("bigout"), "--path", "/?mb=40"]);
    assert_eq!(too_big.status.code(), Some(4));
    assert!(stderr(&too_big).contains("larger than"), "{}", stderr(&too_big));
}

#[test]
fn ten_mib_of_cgi_output_reaches_stdout_whole() {
    let dir = store();
    let out = invoke(dir.path(), &[&fixture_arg("bigout")]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout.len(), 10 << 20);
    assert!(out.stdout.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
}

#[test]
fn the_guest_never_sees_the_host_environment() {
    let dir = store();
    let out = fnrunner()
        .args(["invoke", "--store-dir"])
        .arg(dir.path())
        .args([&fixture_arg("env"), "--env", "ONLY=this"])
        .env("FNRUNNER_TEST_SECRET", "leaked")
        .output()
        .expect("run");
    let body = stdout(&out);
    assert!(body.lines().any(|l| l == "ONLY=this"), "{body}");
    assert!(!body.contains("FNRUNNER_TEST_SECRET"), "host env leaked: {body}");
    assert!(
        !body
            .lines()
            .any(|l| l.starts_with("PATH=") || l.starts_with("HOME=")),
        "{body}"
    );
}

/// Every bad input: exit 2 and exactly one `error:` line saying what.
fn assert_usage_error(out: &std::process::Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(out));
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for needle in needles {
        assert!(lines[0].contains(needle), "missing {needle:?} in {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_modules_get_one_clear_line_and_exit_2() {
    let dir = store();
    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "this is not wasm").expect("write");
    assert_usage_error(
        &invoke(dir.path(), &[text.to_str().expect("path")]),
        &["not a WebAssembly file"],
    );

    let truncated = dir.path().join("cut.wasm");
    let bytes = std::fs::read(fixture("headers")).expect("fixture");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    assert_usage_error(
        &invoke(dir.path(), &[truncated.to_str().expect("path")]),
        &["function `cut`", "is not valid WebAssembly"],
    );

    assert_usage_error(
        &invoke(
            dir.path(),
            &[bad_fixture("unknown-import").to_str().expect("path")],
        ),
        &[
            "function `unknown-import`",
            "does not provide: example:kv/store@1.0.0",
        ],
    );
    assert_usage_error(
        &invoke(dir.path(), &[bad_fixture("no-handler").to_str().expect("path")]),
        &["does not export `wasi:http/incoming-handler"],
    );
    assert_usage_error(
        &invoke(dir.path(), &[bad_fixture("no-start").to_str().expect("path")]),
        &["no `_start` export"],
    );
    let missing = dir.path().join("nowhere.wasm");
    assert_usage_error(
        &invoke(dir.path(), &[missing.to_str().expect("path")]),
        &["nowhere.wasm", "no such file"],
    );
}

#[test]
fn bad_settings_name_the_file_the_key_and_the_problem() {
    let dir = store();
    let module = dir.path().join("f.wasm");
    std::fs::copy(fixture("hello-min"), &module).expect("copy");
    let settings = dir.path().join("f.toml");
    let module_arg = module.to_str().expect("path");

    std::fs::write(&settings, "memory_mb = 32\ntimeout = 5\n").expect("write");
    assert_usage_error(
        &invoke(dir.path(), &[module_arg]),
        &["f.toml:2", "unknown field `timeout`"],
    );

    std::fs::write(&settings, "memory_mb = \"lots\"\n").expect("write");
    assert_usage_error(
        &invoke(dir.path(), &[module_arg]),
        &["f.toml:1", "key `memory_mb`", "invalid type"],
    );

    std::fs::write(&settings, "timeout_ms = 0\n").expect("write");
    assert_usage_error(
        &invoke(dir.path(), &[module_arg]),
        &["f.toml", "key `timeout_ms`", "between 1 and"],
    );

    std::fs::write(&settings, "max_jobs = 4\n").expect("write");
    assert_usage_error(&invoke(dir.path(), &[module_arg]), &["key `max_jobs`", "CGI"]);

    std::fs::write(&settings, "kind = \"http\"\n").expect("write");
    assert_usage_error(&invoke(dir.path(), &[module_arg]), &["key `kind`", "pins `http`"]);
}

#[test]
fn bad_flags_are_usage_errors() {
    let dir = store();
    assert_usage_error(
        &invoke(dir.path(), &[&fixture_arg("hello"), "-H", "no colon"]),
        &["expected `NAME: VALUE`"],
    );
    assert_usage_error(
        &invoke(dir.path(), &[&fixture_arg("hello"), "--path", "relative"]),
        &["must start with `/`"],
    );
    assert_usage_error(
        &invoke(dir.path(), &[&fixture_arg("hello"), "--env", "NOEQUALS"]),
        &["KEY=VALUE"],
    );
    assert_usage_error(
        &invoke(dir.path(), &[&fixture_arg("hello"), "--memory-mb", "0"]),
        &["key `memory_mb`", "between 1 and"],
    );
}
