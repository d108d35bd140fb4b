//! Issue 26: jobs. An index run is a job: listed with its progress, paused and resumed, cancelled
//! leaving a valid library, and after a `kill -9`, interrupted and resumed to the end when the
//! library opens again. The library serves its other users while a job runs or waits.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use keel_engine::{EngineError, Event, Home, Job, JobKind, JobState, Library};
use keel_tests::{create_library, events_of, PASSWORD};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Enough files for several committed batches (each batch is a checkpoint).
const FILES: usize = 6_000;
/// Enough tags for several replay batches (each batch is a checkpoint of a rebuild or verify).
const TAGS: usize = 40_000;

fn tree(root: &Path) -> std::path::PathBuf {
    let tree = root.join("tree");
    for d in 0..10 {
        std::fs::create_dir_all(tree.join(format!("d{d}"))).expect("dir");
    }
    for i in 0..FILES {
        let path = tree.join(format!("d{}/f{i}.txt", i % 10));
        std::fs::write(path, format!("file {i}")).expect("file");
    }
    tree.canonicalize().expect("canonical")
}

/// Waits for a `JobChanged` event that `wanted` accepts; returns its job.
fn wait_job(events: &Receiver<Event>, what: &str, wanted: impl Fn(&Job) -> bool) -> Job {
    let deadline = Instant::now() + WAIT;
    loop {
        match events.recv_deadline(deadline) {
            Ok(Event::JobChanged { job }) if wanted(&job) => return job,
            Ok(_) => {}
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Each file entry's path and content, from the projection.
/// Writes `text` (of the file's size) over `path` and puts its modification time back: a change
/// that size and time hide, which only hashing again finds.
fn edit_hiding_it(path: &Path, text: &str) {
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("time");
    std::fs::write(path, text).expect("same size, other bytes");
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(modified))
        .expect("the old time back");
}

fn files_of(lib: &Library) -> BTreeSet<(String, String)> {
    let location = lib
        .read(|p| p.query().locations())
        .expect("reads")
        .pop()
        .expect("a location");
    lib.read(|p| p.query().entries_of_location(location.uuid))
        .expect("reads")
        .into_iter()
        .filter(|e| e.content.is_some())
        .map(|e| {
            let content = lib
                .get::<keel_engine::ContentIdentity>(e.content.unwrap_or_default())
                .expect("reads")
                .map(|c| c.content_hash)
                .unwrap_or_default();
            (format!("{}/{}", e.relative_path, e.name), content)
        })
        .collect()
}

#[test]
fn an_index_job_pauses_resumes_and_serves_the_library_meanwhile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = tree(dir.path());
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    let events = events_of(&lib);
    std::thread::scope(|scope| {
        let indexing = scope.spawn(|| lib.index(&tree, &mut |_| {}));
        let running = wait_job(&events, "a running job", |j| {
            j.state == JobState::Running && matches!(j.kind, JobKind::Index { .. })
        });
        lib.pause_job(running.id).expect("pauses");
        let paused = wait_job(&events, "the pause", |j| j.state == JobState::Paused);
        assert_eq!(lib.job(running.id).expect("listed").state, JobState::Paused);
        // The library serves its other users while the job waits.
        let tag = keel_tests::tag("while paused");
        lib.transact(|tx| Ok(tx.upsert(&tag))).expect("commits");
        lib.flush().expect("flushes");
        assert!(lib
            .get::<keel_engine::Tag>(tag.uuid)
            .expect("reads")
            .is_some());
        assert!(paused.progress.done < FILES as u64, "{paused:?}");
        assert!(matches!(
            lib.resume_job(Uuid::now_v7()),
            Err(EngineError::NoSuchJob(_))
        ));
        lib.resume_job(running.id).expect("resumes");
        let report = indexing.join().expect("joins").expect("indexes");
        assert_eq!(report.files as usize, FILES);
    });
    let job = lib.jobs().expect("lists").pop().expect("the job");
    assert_eq!(job.state, JobState::Completed);
    assert!(
        job.summary
            .as_deref()
            .is_some_and(|s| s.contains("6000 files")),
        "{job:?}"
    );
    assert_eq!(files_of(&lib).len(), FILES);
    assert!(matches!(
        lib.pause_job(job.id),
        Err(EngineError::JobNotRunning(_))
    ));
}

#[test]
fn a_cancelled_index_job_leaves_a_valid_library() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = tree(dir.path());
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    cancel(&lib, || lib.index(&tree, &mut |_| {}));
    let (report, digest) = lib.verify().expect("verifies");
    assert!(report.faults.is_empty());
    digest.expect("the projections match a replay");
    let partial = files_of(&lib).len();
    assert!(
        partial < FILES,
        "cancelled at the first checkpoint, {partial} files in"
    );
    lib.index(&tree, &mut |_| {}).expect("indexes again");
    assert_eq!(files_of(&lib).len(), FILES);
}

/// `kill -9` in the middle of an index run: the job is interrupted, and resumed to the end when
/// the library opens again, with the same files and contents as a run that was never killed.
#[test]
fn an_index_job_killed_midway_resumes_when_the_library_opens_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = tree(dir.path());
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.close().expect("closes");
    let tree_arg = tree.to_str().expect("utf-8");
    // Killed at its first progress report: the indexing threads run ahead of the reports
    // (under load a kill at 2,200 files taken once found all 6,000 in), so the earliest report
    // leaves the most margin.
    kill_at(&home, &["index", tree_arg], |done, _| done > 0);
    let lib = Library::open(&Home::new(home.root()), "lib", PASSWORD).expect("reopens");
    let interrupted = lib.jobs().expect("lists").pop().expect("the job");
    assert_eq!(interrupted.state, JobState::Interrupted, "{interrupted:?}");
    let before = files_of(&lib).len();
    assert!(before < FILES, "{before} files were in before the kill");
    assert_eq!(lib.resume_jobs().expect("resumes"), 1);
    let resumed = lib.job(interrupted.id).expect("listed");
    assert_eq!(resumed.state, JobState::Completed, "{resumed:?}");
    assert_eq!(lib.resume_jobs().expect("nothing left"), 0);
    let (report, digest) = lib.verify().expect("verifies");
    assert!(report.faults.is_empty());
    digest.expect("the projections match a replay");
    // The same files and contents as a run that was never interrupted.
    let (_other_home, other) = create_library(&dir.path().join("other"), "lib").expect("creates");
    other.index(&tree, &mut |_| {}).expect("indexes");
    assert_eq!(files_of(&lib), files_of(&other));
}

/// `kill -9` in the middle of a re-identify: the job is interrupted with a checkpoint (the first
/// file not yet re-identified, in walk order), and the resumed run hashes only the files from
/// there on (the ones before are indexed by size and time), ending complete: a change that
/// size and time hide, made after the checkpoint, is found.
#[test]
fn a_reidentify_killed_midway_goes_on_from_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = tree(dir.path());
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    let total_bytes: u64 = (0..FILES).map(|i| format!("file {i}").len() as u64).sum();
    lib.close().expect("closes");
    let tree_arg = tree.to_str().expect("utf-8");
    // Paused at its first saved place (every 2,048 files), then killed.
    let (done, total) = kill_at(&home, &["reidentify", tree_arg], |_, _| true);
    assert!(done < total, "{done} of {total}");
    // The last file in walk order (d9 is the last folder, f999 its last name) is changed
    // with its size and time put back: only hashing it again can tell.
    let hidden = tree.join("d9/f999.txt");
    edit_hiding_it(&hidden, "FILE 999");
    let lib = Library::open(&home, "lib", PASSWORD).expect("reopens");
    let interrupted = lib.jobs().expect("lists").pop().expect("the job");
    assert!(
        matches!(interrupted.kind, JobKind::Identify { .. }),
        "{interrupted:?}"
    );
    assert_eq!(interrupted.state, JobState::Interrupted);
    assert!(interrupted.checkpoint.is_some(), "{interrupted:?}");
    let before = lib.files().entry(&hidden).expect("entry").content;
    assert_eq!(lib.resume_jobs().expect("resumes"), 1);
    let resumed = lib.job(interrupted.id).expect("listed");
    assert_eq!(resumed.state, JobState::Completed, "{resumed:?}");
    let summary = resumed.summary.expect("a summary");
    let hashed: u64 = summary
        .split("; ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(
        hashed > 0 && hashed < total_bytes * 3 / 4,
        "the resumed run hashed {hashed} of {total_bytes} bytes: {summary}"
    );
    let after = lib.files().entry(&hidden).expect("entry").content;
    assert_ne!(
        after, before,
        "the hidden change after the checkpoint was found"
    );
}

#[test]
fn finished_jobs_are_kept_as_bounded_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    let runs = keel_engine::JOB_HISTORY_MAX + 3;
    let mut ids = Vec::new();
    for _ in 0..runs {
        let (_, digest) = lib.verify().expect("verifies");
        digest.expect("matches");
        ids.push(lib.jobs().expect("lists").pop().expect("a job").id);
    }
    let kept: Vec<Uuid> = lib
        .jobs()
        .expect("lists")
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(kept.len(), keel_engine::JOB_HISTORY_MAX);
    assert_eq!(kept, ids[3..], "the oldest go first");
    let verify = lib.job(kept[0]).expect("listed");
    assert!(matches!(verify.kind, JobKind::Verify));
    assert!(matches!(
        lib.cancel_job(verify.id),
        Err(EngineError::JobNotRunning(_))
    ));
}

/// A library of `n` tags, committed at once, closed: enough changes for several replay batches.
fn tagged_library(root: &Path, n: usize) -> Home {
    let (home, lib) = create_library(root, "lib").expect("creates");
    lib.transact(|tx| {
        for i in 0..n {
            tx.upsert(&keel_tests::tag(&format!("t{i}")));
        }
        Ok(())
    })
    .expect("commits");
    lib.close().expect("closes");
    home
}

/// Runs `crash_child HOME lib MODE 1` and kills it once it reports progress past its first
/// batch and before its end (where the child stops until the kill, so the kill cannot come
/// after the end).
fn kill_midway(home: &Home, mode: &str) {
    kill_at(home, &[mode, "1"], |done, total| done > 0 && done < total);
}

fn kill_at(home: &Home, args: &[&str], stop: impl Fn(u64, u64) -> bool) -> (u64, u64) {
    let child = Path::new(env!("CARGO_BIN_EXE_crash_child"));
    keel_tests::kill_child_at(child, home, args, stop)
}

/// The position an aside projection left by a stopped job had reached.
fn aside_position(home: &Home, file: &str) -> u64 {
    let path = home.library_dir("lib").join(file);
    assert!(path.exists(), "{file} is kept for the resume");
    let aside = keel_projections::Projections::open(&path).expect("the aside file opens");
    aside.applied_position().expect("reads").log.0
}

/// `kill -9` in the middle of a rebuild: the live projection is untouched; the job is
/// interrupted, and resumes from the position its aside projection reached, ending with the
/// digest a replay gives.
#[test]
fn a_rebuild_killed_midway_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = tagged_library(dir.path(), TAGS);
    let digest = {
        let lib = Library::open(&home, "lib", PASSWORD).expect("opens");
        lib.digest().expect("digest")
    };
    kill_midway(&home, "rebuild");
    let checkpoint = aside_position(&home, keel_engine::REBUILD_FILE);
    assert!(checkpoint > 0, "the aside projection stored a position");
    let lib = Library::open(&home, "lib", PASSWORD).expect("reopens");
    assert_eq!(
        lib.digest().expect("digest"),
        digest,
        "the live projection is untouched"
    );
    let interrupted = lib.jobs().expect("lists").pop().expect("the job");
    assert!(matches!(interrupted.kind, JobKind::Rebuild));
    assert_eq!(interrupted.state, JobState::Interrupted, "{interrupted:?}");
    assert_eq!(lib.resume_jobs().expect("resumes"), 1);
    let resumed = lib.job(interrupted.id).expect("listed");
    assert_eq!(resumed.state, JobState::Completed, "{resumed:?}");
    let replayed: u64 = resumed
        .summary
        .as_deref()
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a count of changes replayed");
    assert!(
        replayed < TAGS as u64,
        "resumed from {checkpoint}: {replayed} changes replayed, not all"
    );
    assert!(!home
        .library_dir("lib")
        .join(keel_engine::REBUILD_FILE)
        .exists());
    assert_eq!(lib.digest().expect("digest"), digest);
    let (report, fresh) = lib.verify().expect("verifies");
    assert!(report.faults.is_empty());
    assert_eq!(fresh.expect("matches"), digest);
}

/// `kill -9` in the middle of a verify: the job resumes from its aside projection's position
/// and reaches the same verdict.
#[test]
fn a_verify_killed_midway_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = tagged_library(dir.path(), TAGS);
    kill_midway(&home, "verify");
    assert!(aside_position(&home, keel_engine::VERIFY_FILE) > 0);
    let lib = Library::open(&home, "lib", PASSWORD).expect("reopens");
    let interrupted = lib.jobs().expect("lists").pop().expect("the job");
    assert!(matches!(interrupted.kind, JobKind::Verify));
    assert_eq!(interrupted.state, JobState::Interrupted, "{interrupted:?}");
    assert_eq!(lib.resume_jobs().expect("resumes"), 1);
    let resumed = lib.job(interrupted.id).expect("listed");
    assert_eq!(resumed.state, JobState::Completed, "{resumed:?}");
    assert!(
        resumed
            .summary
            .as_deref()
            .is_some_and(|s| s.contains("match a fresh replay")),
        "{resumed:?}"
    );
    assert!(!home
        .library_dir("lib")
        .join(keel_engine::VERIFY_FILE)
        .exists());
}

/// Runs `work` (a rebuild or a verify) on another thread, pauses it at its first checkpoint,
/// checks the library serves meanwhile, then resumes it to its end.
fn pause_and_resume<T: Send>(
    lib: &Library,
    kind: &str,
    work: impl FnOnce() -> Result<T, EngineError> + Send,
) -> T {
    let events = events_of(lib);
    std::thread::scope(|scope| {
        let running = scope.spawn(work);
        let job = wait_job(&events, "a running job", |j| j.state == JobState::Running);
        lib.pause_job(job.id).expect("pauses");
        let paused = wait_job(&events, "the pause", |j| j.state == JobState::Paused);
        assert!(
            paused.progress.done < paused.progress.total.max(1),
            "{kind}: {paused:?}"
        );
        // Reads and commits go on while the job waits.
        let tag = keel_tests::tag(&format!("while the {kind} is paused"));
        lib.transact(|tx| Ok(tx.upsert(&tag))).expect("commits");
        lib.flush().expect("flushes");
        assert!(lib
            .get::<keel_engine::Tag>(tag.uuid)
            .expect("reads")
            .is_some());
        lib.resume_job(job.id).expect("resumes");
        let done = running.join().expect("joins").expect("ends");
        assert_eq!(lib.job(job.id).expect("listed").state, JobState::Completed);
        done
    })
}

/// Starts `work` on another thread and cancels it as soon as it runs.
fn cancel<T: Send + std::fmt::Debug>(
    lib: &Library,
    work: impl FnOnce() -> Result<T, EngineError> + Send,
) {
    let events = events_of(lib);
    std::thread::scope(|scope| {
        let running = scope.spawn(work);
        let job = wait_job(&events, "a running job", |j| j.state == JobState::Running);
        lib.cancel_job(job.id).expect("cancels");
        let outcome = running.join().expect("joins");
        assert!(
            matches!(outcome, Err(EngineError::Cancelled)),
            "{outcome:?}"
        );
        assert_eq!(lib.job(job.id).expect("listed").state, JobState::Cancelled);
    });
}

/// A rebuild pauses, serves meanwhile and resumes, its result including what was committed
/// while it waited; a cancelled one leaves the live projection as it was, and no aside file.
#[test]
fn a_rebuild_pauses_resumes_and_cancels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = tagged_library(dir.path(), TAGS);
    let lib = Library::open(&home, "lib", PASSWORD).expect("opens");
    let report = pause_and_resume(&lib, "rebuild", || lib.rebuild(&mut |_, _| {}));
    assert!(report.changes > TAGS as u64, "{report:?}");
    let (_, fresh) = lib.verify().expect("verifies");
    let digest = fresh.expect("the rebuilt projection matches a replay");
    assert_eq!(
        lib.read(|p| p.query().counts()).expect("counts").tags,
        TAGS as u64 + 1
    );
    cancel(&lib, || lib.rebuild(&mut |_, _| {}));
    assert!(!home
        .library_dir("lib")
        .join(keel_engine::REBUILD_FILE)
        .exists());
    assert_eq!(lib.digest().expect("digest"), digest);
}

/// A verify pauses and resumes to its verdict; a cancelled one leaves no aside file.
#[test]
fn a_verify_pauses_resumes_and_cancels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = tagged_library(dir.path(), TAGS);
    let lib = Library::open(&home, "lib", PASSWORD).expect("opens");
    let (report, verdict) = pause_and_resume(&lib, "verify", || lib.verify());
    assert!(report.faults.is_empty());
    verdict.expect("matches, with the commit made while it was paused");
    cancel(&lib, || lib.verify());
    assert!(!home
        .library_dir("lib")
        .join(keel_engine::VERIFY_FILE)
        .exists());
}

/// Catching up a long log is a job: a device back after an absence lists it with its progress,
/// completed once the log here reaches the leader's end.
#[test]
fn catching_up_a_long_log_is_a_job() {
    use keel_tests::cluster::{converge, founder, joiner, restart};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder(dir.path(), "a", "lib").expect("founder");
    let (home_b, b) = joiner(dir.path(), "b", &a).expect("joins");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    let listen = b.local_addr();
    b.stop().expect("b goes away");
    a.library()
        .transact(|tx| {
            for i in 0..3_000 {
                tx.upsert(&keel_tests::tag(&format!("while away {i}")));
            }
            Ok(())
        })
        .expect("a commits");
    let b = restart(&home_b, "lib", listen).expect("b comes back");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    let deadline = Instant::now() + WAIT;
    let job = loop {
        let found = b
            .library()
            .jobs()
            .expect("lists")
            .into_iter()
            .find(|j| matches!(j.kind, JobKind::CatchUp));
        if let Some(job) = found.filter(|j| j.state == JobState::Completed) {
            break job;
        }
        assert!(Instant::now() < deadline, "no completed catch-up job");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        job.progress.total >= keel_engine::CATCH_UP_JOB_MIN,
        "{job:?}"
    );
    assert_eq!(job.progress.done, job.progress.total, "{job:?}");
}

/// A verify reports its progress as a job (it showed none before): the finished job counts
/// every change replayed.
#[test]
fn a_verify_reports_its_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.transact(|tx| {
        for i in 0..500 {
            tx.upsert(&keel_tests::tag(&format!("t{i}")));
        }
        Ok(())
    })
    .expect("commits");
    let (_, digest) = lib.verify().expect("verifies");
    digest.expect("matches");
    let job = lib.jobs().expect("lists").pop().expect("the job");
    assert!(matches!(job.kind, JobKind::Verify));
    assert!(job.progress.total >= 500, "{job:?}");
    assert_eq!(job.progress.done, job.progress.total, "{job:?}");
}

/// A join killed (`kill -9`) once part of the inviter's log is stored continues instead of
/// starting over: the device is paired before the snapshot begins, its join job is interrupted,
/// and its node catches up from the log it stored, to the inviter's digest.
#[test]
fn a_join_killed_midway_continues_from_what_it_stored() {
    use keel_tests::cluster::{converge, founder_with_tags, options};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder_with_tags(dir.path(), "a", "lib", 40_000).expect("founder");
    let leader_end = a.status().log_len;
    let invite = a.invite(true).expect("invites");
    let home_b = Home::new(dir.path().join("b"));
    let addr = a.local_addr().to_string();
    let (stored, total) = kill_at(
        &home_b,
        &["join", &addr, invite.code.as_str()],
        |stored, _| stored > 0,
    );
    eprintln!("killed with {stored} of {total} log entries stored");
    let lib = Library::open(&home_b, "lib", PASSWORD).expect("the cut join's library opens");
    let kept = lib.status().expect("status").journal.log_len;
    assert!(
        kept >= stored,
        "{kept} entries kept of {stored} reported stored"
    );
    let join = lib.jobs().expect("lists").pop().expect("the join's job");
    assert!(matches!(join.kind, JobKind::Join { .. }), "{join:?}");
    assert_eq!(join.state, JobState::Interrupted, "{join:?}");
    let b = keel_node::Node::start(lib, options(vec![a.local_addr()])).expect("starts");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    let jobs = b.library().jobs().expect("lists");
    let resumed = jobs.iter().find(|j| j.id == join.id).expect("still listed");
    assert_eq!(resumed.state, JobState::Completed, "{resumed:?}");
    // It went on from what it stored, not from zero: no catch-up covered the whole log.
    let from_zero = jobs
        .iter()
        .find(|j| matches!(j.kind, JobKind::CatchUp) && j.progress.total >= leader_end);
    assert!(from_zero.is_none(), "{from_zero:?} of {leader_end}");
}

/// A join that runs to its end is a completed job in the new library, its log all stored.
#[test]
fn a_join_is_a_job() {
    use keel_tests::cluster::{founder, joiner};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder(dir.path(), "a", "lib").expect("founder");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("joins");
    let join = b
        .library()
        .jobs()
        .expect("lists")
        .into_iter()
        .find(|j| matches!(j.kind, JobKind::Join { .. }))
        .expect("the join's job");
    assert_eq!(join.state, JobState::Completed, "{join:?}");
    assert_eq!(join.progress.done, join.progress.total, "{join:?}");
}

/// Re-identifying contents is a job: a file whose bytes changed while its size and time stayed
/// (which an index does not see) gets its new content and keeps its entry; every other file is
/// hashed again and found as it was. A cancelled one leaves a valid library.
#[test]
fn reidentifying_finds_a_change_that_size_and_time_hide() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = tree(dir.path());
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    let path = tree.join("d0/f0.txt");
    let before = lib.files().entry(&path).expect("the entry");
    edit_hiding_it(&path, "FILE 0");
    let indexed = lib.index(&tree, &mut |_| {}).expect("indexes");
    assert_eq!(
        indexed.changed, 0,
        "size and time hide the change from an index"
    );
    let report = lib.reidentify(&tree, &mut |_| {}).expect("re-identifies");
    assert_eq!(report.changed, 1, "{report:?}");
    assert_eq!(
        report.unchanged,
        FILES as u64 - 1 + report.dirs,
        "{report:?}"
    );
    let after = lib.files().entry(&path).expect("the entry");
    assert_eq!(after.uuid, before.uuid, "the entry is kept");
    assert_ne!(after.content, before.content, "its content is the new one");
    let job = lib.jobs().expect("lists").pop().expect("the job");
    assert!(matches!(job.kind, JobKind::Identify { .. }), "{job:?}");
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    cancel(&lib, || lib.reidentify(&tree, &mut |_| {}));
    let (faults, digest) = lib.verify().expect("verifies");
    assert!(faults.faults.is_empty());
    digest.expect("the projections match a replay");
    assert!(matches!(
        lib.reidentify(dir.path(), &mut |_| {}),
        Err(EngineError::NotInLocation(_))
    ));
}
