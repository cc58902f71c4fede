use super::*;
use crate::users::model::UserType;

fn patch(json: &str) -> UserPatch {
    serde_json::from_str(json).unwrap()
}

fn user(token: &str) -> User {
    User::new(token.into(), UserType::Normal, 1)
}

fn only_upsert(taken: &TakenChanges) -> &UserChange {
    assert_eq!(taken.changes.len(), 1, "{:?}", taken.changes);
    match &taken.changes[0] {
        Change::Upsert(c) => c,
        other => panic!("expected upsert, got {other:?}"),
    }
}

#[test]
fn create_then_get_and_refuse_duplicates() {
    let cache = UserCache::default();
    cache.create(&user("a")).unwrap();
    assert_eq!(cache.user("a").unwrap().token, "a");
    assert_eq!(cache.create(&user("a")), Err(CacheError::Exists));
    assert!(cache.get("b").is_none());
}

#[test]
fn tickets_grow_and_covers_reports_them() {
    let cache = UserCache::default();
    let t1 = cache.create(&user("a")).unwrap();
    let t2 = cache.create(&user("b")).unwrap();
    assert!(t2 > t1);
    let taken = cache.take_changes(100);
    assert_eq!(taken.changes.len(), 2);
    assert_eq!(taken.covers, Some(t2));
}

#[test]
fn partial_take_does_not_claim_to_cover() {
    let cache = UserCache::default();
    for t in ["a", "b", "c"] {
        cache.create(&user(t)).unwrap();
    }
    let taken = cache.take_changes(2);
    assert_eq!(taken.changes.len(), 2);
    assert_eq!(taken.covers, None);
    assert_eq!(cache.take_changes(2).changes.len(), 1);
}

#[test]
fn upsert_creates_missing_user_from_defaults() {
    let cache = UserCache::default();
    let (u, _) = cache.upsert("new", &patch(r#"{"nickname":"n","maxIps":2}"#), 42);
    assert_eq!(
        (u.created_at, u.max_ips, u.user_type),
        (42, Some(2), UserType::Normal)
    );
    let c = only_upsert(&cache.take_changes(10)).clone();
    assert!(c.fields.contains(Fields::CREATED));
}

/// The answer to a `PUT` is the user as stored (zero family entries are not kept), whether the
/// upsert created it or changed it: an import's `upserted_users` were otherwise inconsistent.
#[test]
fn upsert_answers_with_the_user_as_stored() {
    let cache = UserCache::default();
    let body = r#"{"tokenCounts":{"turbo":0,"gpt4":5},"tokenLimits":{"gpt4":0},"tokenRefresh":{"gpt4":0}}"#;
    for token in ["new", "new"] {
        let (answered, _) = cache.upsert(token, &patch(body), 42);
        assert_eq!(answered, cache.user(token).unwrap(), "{token}");
    }
    let (answered, _) = cache.upsert_many(&[("new2".into(), patch(body))], 42);
    assert_eq!(answered, vec![cache.user("new2").unwrap()]);
}

#[test]
fn upsert_marks_only_patched_fields() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    cache.upsert("a", &patch(r#"{"disabledAt":5,"disabledReason":"x"}"#), 9);
    let taken = cache.take_changes(10);
    let c = only_upsert(&taken);
    assert_eq!(c.fields, Fields::DISABLED_AT | Fields::DISABLED_REASON);
    assert_eq!(c.user.disabled_reason.as_deref(), Some("x"));
}

#[test]
fn requests_are_counted_once_across_takes() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    let rec = cache.get("a").unwrap();
    for _ in 0..5 {
        cache.count_request(&rec, 100);
    }
    let taken = cache.take_changes(10);
    let c = only_upsert(&taken);
    assert_eq!((c.prompt_delta, c.user.prompt_count), (5, 5));
    assert_eq!(c.user.last_used_at, Some(100));
    cache.count_request(&rec, 101);
    cache.acknowledge(&taken.changes, true);
    let next = cache.take_changes(10);
    let c = only_upsert(&next);
    assert_eq!((c.prompt_delta, c.user.prompt_count), (1, 6));
}

#[test]
fn requeue_during_take_merges_into_one_change() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    let rec = cache.get("a").unwrap();
    cache.count_request(&rec, 1);
    // Simulate a concurrent re-queue: the record is queued twice before a take.
    let (_, d, _) = rec.take_pending();
    cache.count_request(&rec, 2);
    cache.queue.push(Queued::User(rec.clone()));
    let taken = cache.take_changes(10);
    let c = only_upsert(&taken);
    assert_eq!(c.prompt_delta + d, 2);
}

/// A stream snapshot older than the user removes it; the event right behind brings it back
/// as a new record. The requests counted on the removed record are written with the new one.
#[test]
fn requests_counted_on_a_user_the_store_removed_and_brought_back_are_kept() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    let removed = cache.get("a").unwrap();
    for _ in 0..3 {
        cache.count_request(&removed, 10);
    }
    cache.apply_remote("a", None);
    assert!(cache.get("a").is_none());
    cache.apply_remote("a", Some(&user("a")));
    let current = cache.get("a").unwrap();
    cache.count_request(&current, 11);
    // A request that authenticated on the removed record, answered after its removal.
    cache.count_request(&removed, 12);
    let taken = cache.take_changes(10);
    let change = only_upsert(&taken);
    assert!(Arc::ptr_eq(&change.record, &current));
    assert_eq!(change.prompt_delta, 5);
    assert!(change.fields.contains(Fields::PROMPT_DELTA));
}

/// The user comes back only after a flush took the removed record (the events behind a slow
/// snapshot arrive after it): its requests wait on it and go over when the user is back.
#[test]
fn requests_counted_on_a_removed_user_go_over_when_it_comes_back_after_a_flush() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    let removed = cache.get("a").unwrap();
    cache.count_request(&removed, 10);
    cache.apply_remote("a", None);
    assert!(
        cache.take_changes(10).changes.is_empty(),
        "nothing to write yet"
    );
    cache.apply_remote("a", Some(&user("a")));
    let current = cache.get("a").unwrap();
    let taken = cache.take_changes(10);
    let change = only_upsert(&taken);
    assert!(Arc::ptr_eq(&change.record, &current));
    assert_eq!(change.prompt_delta, 1);
    // A request that authenticated on the removed record and is answered now.
    cache.count_request(&removed, 11);
    assert_eq!(only_upsert(&cache.take_changes(10)).prompt_delta, 1);
}

/// A user the store removed and that does not come back is let go after a while, so records
/// removed between two snapshots (which may be days apart) do not pile up.
#[test]
fn records_the_store_removed_are_let_go_after_a_while() {
    let mut removed = RemovedByStore::default();
    let record = |token: &str| Arc::new(UserRecord::from_user(&user(token)));
    let start = Instant::now();
    removed.insert(record("a"), start);
    removed.insert(record("b"), start + REMOVED_KEPT_FOR / 2);
    assert_eq!(
        removed.len(),
        2,
        "nothing is swept before a period has passed"
    );
    removed.insert(
        record("c"),
        start + REMOVED_KEPT_FOR + Duration::from_secs(1),
    );
    assert!(removed.take("a").is_none(), "kept longer than the period");
    assert!(removed.take("b").is_some());
    assert!(removed.take("c").is_some());
}

/// Removed for good, or removed by an admin here: its requests count nothing more.
#[test]
fn requests_counted_on_a_user_removed_for_good_are_not_written() {
    let cache = UserCache::default();
    cache.load([user("a"), user("b")]);
    let (a, b) = (cache.get("a").unwrap(), cache.get("b").unwrap());
    cache.count_request(&a, 10);
    cache.count_request(&b, 10);
    cache.apply_remote("a", None);
    cache.remove("b").unwrap();
    cache.apply_remote("b", Some(&user("b")));
    let taken = cache.take_changes(10);
    assert!(
        matches!(taken.changes[..], [Change::Delete { .. }]),
        "{:?}",
        taken.changes
    );
}

#[test]
fn remove_queues_a_delete_and_blocks_stale_remote_copies() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    cache.remove("a").unwrap();
    assert!(cache.get("a").is_none());
    cache.apply_remote("a", Some(&user("a")));
    assert!(
        cache.get("a").is_none(),
        "store has not seen the delete yet"
    );
    let taken = cache.take_changes(10);
    assert!(matches!(taken.changes[..], [Change::Delete { .. }]));
    cache.acknowledge(&taken.changes, true);
    cache.apply_remote("a", Some(&user("a")));
    assert!(
        cache.get("a").is_some(),
        "re-created elsewhere after the delete"
    );
}

#[test]
fn delete_then_recreate_writes_the_new_user_whole() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    cache.remove("a").unwrap();
    cache.create(&user("a")).unwrap();
    let taken = cache.take_changes(10);
    assert!(only_upsert(&taken).fields.contains(Fields::CREATED));
}

#[test]
fn remote_snapshot_removes_missing_users_but_not_unwritten_new_ones() {
    let cache = UserCache::default();
    cache.load([user("old")]);
    cache.create(&user("fresh")).unwrap();
    let mut remote = HashMap::new();
    remote.insert("other".to_string(), user("other"));
    cache.replace_all_remote(&remote);
    assert!(cache.get("old").is_none());
    assert!(cache.get("fresh").is_some());
    assert!(cache.get("other").is_some());
}

/// The end of a snapshot applied one user at a time: the same removals as a whole one.
#[test]
fn a_snapshot_given_user_by_user_removes_the_users_it_does_not_hold() {
    let cache = UserCache::default();
    cache.load([user("old"), user("kept")]);
    cache.create(&user("fresh")).unwrap();
    cache.apply_remote("other", Some(&user("other")));
    let kept = cache.remove_absent_remote(|token| matches!(token, "other" | "kept"), 0);
    assert_eq!(
        kept.tokens,
        [Arc::from("fresh")],
        "kept until the store is asked"
    );
    assert!(cache.get("old").is_none());
    for token in ["kept", "fresh", "other"] {
        assert!(cache.get(token).is_some(), "{token}");
    }
    assert_eq!(
        cache.take_changes(10).changes.len(),
        1,
        "only the creation is queued"
    );
}

/// Writes `user`'s pending changes and has the store confirm them.
fn write_and_confirm(cache: &UserCache) {
    let taken = cache.take_changes(100);
    assert!(!taken.changes.is_empty());
    cache.acknowledge(&taken.changes, false);
}

/// A stream snapshot may be older than what the cache knows: a user whose write was confirmed
/// after the connection was opened, or with an edit not confirmed yet, is kept when the
/// snapshot lacks it, for the store to be asked about it; the store holding it keeps it.
#[test]
fn a_snapshot_keeps_users_it_may_be_older_than_until_the_store_is_asked() {
    let cache = UserCache::default();
    cache.load([user("edited"), user("old")]);
    // Created and confirmed before the connection was opened: in any snapshot of it.
    cache.create(&user("before")).unwrap();
    write_and_confirm(&cache);
    let opened_at = cache.confirmations();
    cache.create(&user("created")).unwrap();
    write_and_confirm(&cache);
    let edited = cache.get("edited").unwrap();
    cache.upsert("edited", &patch(r#"{"nickname":"new"}"#), 5);

    let mut kept = cache.remove_absent_remote(|_| false, opened_at);
    kept.tokens.sort();
    assert_eq!(kept.tokens, [Arc::from("created"), Arc::from("edited")]);
    assert!(cache.get("old").is_none(), "nothing newer: removed at once");
    assert!(
        cache.get("before").is_none(),
        "confirmed before the connection opened"
    );
    let asked_at = cache.confirmations();
    for token in ["created", "edited"] {
        assert_eq!(
            cache.settle_absent(token, kept.snapshot, true, asked_at),
            Settled::Done
        );
        assert!(cache.get(token).is_some(), "{token}");
    }
    assert!(Arc::ptr_eq(&cache.get("edited").unwrap(), &edited));
    assert_eq!(
        cache.user("edited").unwrap().nickname.as_deref(),
        Some("new")
    );
    assert!(only_upsert(&cache.take_changes(10))
        .fields
        .contains(Fields::NICKNAME));
}

/// A user kept after a snapshot that the store does not hold either was removed elsewhere
/// before the snapshot: removed when the store's answer comes, unless a write of it was
/// confirmed since the store was asked (asked again) or a store change settled it first.
#[test]
fn a_user_kept_after_a_snapshot_is_removed_when_the_store_lacks_it_too() {
    let cache = UserCache::default();
    let opened_at = cache.confirmations();
    for token in ["gone", "raced", "changed", "created"] {
        cache.create(&user(token)).unwrap();
    }
    write_and_confirm(&cache);
    cache.create(&user("unwritten")).unwrap();
    let kept = cache.remove_absent_remote(|_| false, opened_at);
    assert_eq!(kept.tokens.len(), 5);
    let asked_at = cache.confirmations();

    assert_eq!(
        cache.settle_absent("gone", kept.snapshot, false, asked_at),
        Settled::Done
    );
    assert!(cache.get("gone").is_none());

    // A store change after the snapshot is newer than the answer.
    cache.apply_remote("changed", Some(&user("changed")));
    assert_eq!(
        cache.settle_absent("changed", kept.snapshot, false, asked_at),
        Settled::Done
    );
    assert!(cache.get("changed").is_some());

    // Created here and not written yet: its write settles it.
    assert_eq!(
        cache.settle_absent("unwritten", kept.snapshot, false, asked_at),
        Settled::Done
    );
    assert!(cache.get("unwritten").is_some());

    // A write confirmed after the store was asked may be missing from its answer.
    cache.upsert("raced", &patch(r#"{"nickname":"n"}"#), 5);
    write_and_confirm(&cache);
    assert_eq!(
        cache.settle_absent("raced", kept.snapshot, false, asked_at),
        Settled::AskAgain
    );
    assert!(cache.get("raced").is_some());
    let asked_again = cache.confirmations();
    assert_eq!(
        cache.settle_absent("raced", kept.snapshot, false, asked_again),
        Settled::Done
    );
    assert!(cache.get("raced").is_none());

    // A newer snapshot decides again: an answer to an older one's question is ignored.
    let newer = cache.remove_absent_remote(|token| token != "created", asked_again);
    assert_eq!(newer.tokens, Vec::<Arc<str>>::new());
    assert!(
        cache.get("created").is_none(),
        "nothing confirmed since it opened"
    );
    let _ = cache.settle_absent("unwritten", kept.snapshot, false, asked_again);
    assert!(cache.get("unwritten").is_some());
}

/// SQLite's full read is taken in one transaction with every change of this process
/// confirmed or queued: never older than the cache, so the users it lacks go at once.
#[test]
fn a_full_read_back_removes_confirmed_users_it_lacks_at_once() {
    let cache = UserCache::default();
    cache.create(&user("a")).unwrap();
    write_and_confirm(&cache);
    cache.replace_all_remote(&HashMap::new());
    assert!(cache.get("a").is_none());
}

#[test]
fn remote_changes_are_not_queued() {
    let cache = UserCache::default();
    cache.apply_remote("a", Some(&user("a")));
    let mut u = user("a");
    u.nickname = Some("n".into());
    cache.apply_remote("a", Some(&u));
    assert!(cache.take_changes(10).changes.is_empty());
    assert_eq!(cache.user("a").unwrap().nickname.as_deref(), Some("n"));
}

#[test]
fn disable_sets_reason_and_refreshable_false() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    let (u, _) = cache.disable("a", Some("abuse"), 7).unwrap();
    assert_eq!(
        (u.disabled_at, u.disabled_reason.as_deref()),
        (Some(7), Some("abuse"))
    );
    assert_eq!(
        u.meta.unwrap()["refreshable"],
        serde_json::Value::Bool(false)
    );
    assert_eq!(
        cache.disable("zz", None, 7).unwrap_err(),
        CacheError::NotFound
    );
}

#[test]
fn admin_prompt_count_is_absolute() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    let rec = cache.get("a").unwrap();
    cache.count_request(&rec, 1);
    cache.upsert("a", &patch(r#"{"promptCount":100}"#), 1);
    assert_eq!(rec.prompt_count(), 100);
}

#[test]
fn an_absolute_prompt_count_set_while_a_write_is_in_flight_stays_absolute() {
    let cache = UserCache::default();
    cache.create(&user("a")).unwrap();
    let created = cache.take_changes(10);
    cache.acknowledge(&created.changes, true);
    let record = cache.get("a").unwrap();
    for _ in 0..3 {
        cache.count_request(&record, 5);
    }
    let in_flight = cache.take_changes(10);
    cache.upsert("a", &patch(r#"{"promptCount": 0}"#), 6);
    cache.acknowledge(&in_flight.changes, true);
    assert_eq!(cache.user("a").unwrap().prompt_count, 0);
    let next = cache.take_changes(10);
    assert_eq!(only_upsert(&next).user.prompt_count, 0, "written as set");
}

#[test]
fn a_store_change_kept_out_during_a_write_is_asked_to_be_read_again() {
    let cache = UserCache::default();
    cache.load([user("a"), user("b")]);
    cache.disable("a", Some("abuse"), 5).unwrap();
    cache.disable("b", Some("abuse"), 5).unwrap();
    let in_flight = cache.take_changes(10);
    // While the write is on the wire, the store re-enables "a" (another instance, the console).
    let mut reenabled = user("a");
    reenabled.disabled_at = None;
    cache.apply_remote("a", Some(&reenabled));
    assert_eq!(
        cache.user("a").unwrap().disabled_at,
        Some(5),
        "kept while in flight"
    );
    assert!(
        cache.take_rereads().is_empty(),
        "nothing before the write is confirmed"
    );
    cache.acknowledge(&in_flight.changes, false);
    let rereads: Vec<String> = cache
        .take_rereads()
        .iter()
        .map(|r| r.token.to_string())
        .collect();
    assert_eq!(
        rereads,
        vec!["a"],
        "only the user a store change was kept out of"
    );
    assert!(cache.take_rereads().is_empty());
    // A store change outside any write is applied at once and needs no re-read.
    cache.apply_remote("a", Some(&reenabled));
    assert_eq!(cache.user("a").unwrap().disabled_at, None);
    cache.acknowledge(&cache.take_changes(10).changes, false);
    assert!(cache.take_rereads().is_empty());
}

#[test]
fn an_admin_edit_racing_store_changes_is_never_overwritten() {
    // Another instance's counter echoes arrive all the time for an active user; an admin edit
    // landing between two of them must survive, and stay queued for the store.
    let cache = Arc::new(UserCache::default());
    cache.create(&user("a")).unwrap();
    let created = cache.take_changes(10);
    cache.acknowledge(&created.changes, true);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echoes = {
        let (cache, stop) = (Arc::clone(&cache), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut remote = user("a");
            remote.nickname = Some("remote".into());
            while !stop.load(Ordering::Relaxed) {
                remote.prompt_count += 1;
                cache.apply_remote("a", Some(&remote));
            }
        })
    };
    for i in 0..20_000 {
        let nickname = format!("admin {i}");
        cache.upsert("a", &patch(&format!(r#"{{"nickname": "{nickname}"}}"#)), 7);
        assert_eq!(
            cache.user("a").unwrap().nickname.as_deref(),
            Some(nickname.as_str()),
            "edit {i} was overwritten by a store change"
        );
        let taken = cache.take_changes(10);
        assert!(only_upsert(&taken).fields.contains(Fields::NICKNAME));
        assert_eq!(
            only_upsert(&taken).user.nickname.as_deref(),
            Some(nickname.as_str()),
            "edit {i}: the store is sent the edit"
        );
        cache.acknowledge(&taken.changes, false);
    }
    stop.store(true, Ordering::Relaxed);
    echoes.join().unwrap();
}

#[test]
fn an_upsert_of_a_record_removed_meanwhile_is_not_confirmed() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    // The PUT found the record, then a hard delete removed it before the edit landed.
    let record = cache.get("a").unwrap();
    cache.remove("a").unwrap();
    let edit = patch(r#"{"nickname":"n"}"#);
    assert!(cache.upsert_existing(&record, &edit).is_none());
    // What `upsert` then does: the PUT creates the user anew, written whole after the delete.
    let (user, _) = cache.upsert("a", &edit, 5);
    assert_eq!((user.nickname.as_deref(), user.created_at), (Some("n"), 5));
    assert!(cache.get("a").is_some_and(|r| !r.is_deleted()));
    let taken = cache.take_changes(10);
    assert!(only_upsert(&taken).fields.contains(Fields::CREATED));
}

#[test]
fn a_disable_of_a_record_removed_meanwhile_is_not_found() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    let record = cache.get("a").unwrap();
    cache.remove("a").unwrap();
    assert_eq!(
        cache.disable_record(&record, Some("r"), 5).unwrap_err(),
        CacheError::NotFound
    );
    assert_eq!(
        cache.disable("a", None, 5).unwrap_err(),
        CacheError::NotFound
    );
    let taken = cache.take_changes(10);
    assert!(matches!(taken.changes[..], [Change::Delete { .. }]));
}

#[test]
fn an_upsert_of_an_unknown_token_may_exist_in_the_store_a_recreation_may_not() {
    let cache = UserCache::default();
    cache.upsert("new", &patch(r#"{"nickname":"n"}"#), 42);
    let c = only_upsert(&cache.take_changes(10)).clone();
    assert_eq!(
        c.fields,
        Fields::CREATED | Fields::UPSERTED | Fields::NICKNAME
    );
    // The store's copy arrives before the write: it stands, except the upsert's field.
    let mut remote = user("new");
    remote.user_type = UserType::Special;
    remote.nickname = Some("stored".into());
    cache.apply_remote("new", Some(&remote));
    let now = cache.user("new").unwrap();
    assert_eq!(
        (now.user_type, now.nickname.as_deref()),
        (UserType::Special, Some("n"))
    );
    // Removed here, then upserted again: a replacement, written whole.
    cache.load([user("old")]);
    cache.remove("old").unwrap();
    cache.upsert("old", &patch(r#"{"nickname":"n"}"#), 42);
    let taken = cache.take_changes(10);
    let Change::Upsert(c) = &taken.changes[0] else {
        panic!("{:?}", taken.changes)
    };
    assert_eq!(c.fields, Fields::CREATED | Fields::ALL);
}

/// A request counted while a take runs queues the user again, and the same take can pop it a
/// second time: the merged change must carry the whole count, not only the second part's. An
/// absolute write (a new user, an admin's `promptCount`) stores that count as the total.
#[test]
fn a_user_taken_twice_in_one_take_writes_its_whole_count() {
    let cache = UserCache::default();
    cache.load([user("a")]);
    let rec = cache.get("a").unwrap();
    cache.upsert("a", &patch(r#"{"promptCount":10}"#), 1);
    cache.count_request(&rec, 2);
    cache.count_request(&rec, 2);
    let mut changes = Vec::new();
    let mut index = HashMap::new();
    let Some(Queued::User(first)) = cache.queue.pop() else {
        panic!("queued once");
    };
    merge_into(&mut changes, &mut index, take_user_change(first));
    // A request between the two pops of one `take_changes`.
    cache.count_request(&rec, 3);
    let Some(Queued::User(again)) = cache.queue.pop() else {
        panic!("queued again");
    };
    merge_into(&mut changes, &mut index, take_user_change(again));
    assert_eq!(changes.len(), 1);
    let Change::Upsert(c) = &changes[0] else {
        panic!("an upsert");
    };
    assert!(c.fields.contains(Fields::PROMPT_COUNT));
    assert_eq!(c.prompt_delta, 3);
    assert_eq!(rec.prompt_count(), 13);
    assert_eq!(c.user.prompt_count, 13, "the absolute count written");
    cache.acknowledge(&changes, true);
    assert_eq!(rec.prompt_count(), 13);
}

/// An edit made while a write is being taken belongs wholly to that write or to a later one:
/// taken with it, its ticket is covered by the write's `taken_at`, or the store's refusal of
/// it would not reach the admin waiting on that ticket (who was answered "persisted"). Edits
/// race takes of many queued users; the edited user is queued last.
#[test]
fn an_edit_made_during_a_take_is_in_it_exactly_when_its_ticket_is_covered() {
    let cache = Arc::new(UserCache::default());
    let others: Vec<String> = (0..2_000).map(|i| format!("u{i}")).collect();
    for token in &others {
        cache
            .create(&User::new(token.clone(), UserType::Normal, 1))
            .unwrap();
    }
    cache
        .create(&User::new("edited".into(), UserType::Normal, 1))
        .unwrap();
    for round in 0..40 {
        cache.take_changes(usize::MAX);
        for token in &others {
            cache.touch(&cache.get(token).unwrap(), 2 + round);
        }
        cache.upsert("edited", &patch(r#"{"nickname":"queued"}"#), 1);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let taker = std::thread::spawn({
            let (cache, barrier) = (Arc::clone(&cache), Arc::clone(&barrier));
            move || {
                barrier.wait();
                cache.take_changes(usize::MAX)
            }
        });
        barrier.wait();
        let nickname = format!("round {round}");
        let edit = patch(&format!(r#"{{"nickname":"{nickname}"}}"#));
        let (_, ticket) = cache.upsert("edited", &edit, 1);
        let taken = taker.join().unwrap();
        let in_take = taken.changes.iter().any(|c| match c {
            Change::Upsert(u) => u.user.nickname.as_deref() == Some(nickname.as_str()),
            Change::Delete { .. } => false,
        });
        assert_eq!(
            in_take,
            ticket <= taken.taken_at,
            "round {round}: edit ticket {ticket}, taken at {}",
            taken.taken_at
        );
    }
}
