use super::*;

fn cfg(world: usize) -> StateConfig {
    StateConfig {
        world,
        heartbeat_timeout: Duration::from_secs(10),
        join_timeout: Duration::from_secs(300),
        heartbeat_interval: Duration::from_secs(1),
        generation: 1,
    }
}

fn joiner(host: &str, local: Option<u32>, pid: u32, launcher: Option<u32>) -> JoinInfo {
    JoinInfo {
        host: host.into(),
        local_rank: local,
        pid,
        launcher_rank: launcher,
        launcher_world: None,
        config_hash: "cfg-a".into(),
        version: "0.1.0".into(),
        data_addr: format!("{host}:{pid}"),
        generation: None,
    }
}

/// Joins everyone at `t0` and returns the memberships in join order.
fn join_all(state: &mut CoordinatorState, infos: Vec<JoinInfo>, t0: Instant) -> Vec<Membership> {
    let tickets: Vec<JoinTicket> =
        infos.into_iter().map(|i| state.on_join(i, t0).expect("join accepted")).collect();
    tickets
        .into_iter()
        .map(|t| state.join_result(t).expect("world formed").expect("no refusal"))
        .collect()
}

#[test]
fn join_waits_for_the_whole_world() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(3), t0).unwrap();
    let a = s.on_join(joiner("h", None, 1, None), t0).unwrap();
    assert!(s.join_result(a).is_none());
    let b = s.on_join(joiner("h", None, 2, None), t0).unwrap();
    assert!(s.join_result(a).is_none() && s.join_result(b).is_none());
    s.on_join(joiner("h", None, 3, None), t0).unwrap();
    assert_eq!(s.phase(), &Phase::Running);
    assert_eq!(s.join_result(a).unwrap().unwrap().world, 3);
}

#[test]
fn dense_launcher_ranks_are_used() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(3), t0).unwrap();
    // Join order and sort order both disagree with the launcher ranks.
    let ms = join_all(
        &mut s,
        vec![
            joiner("a", None, 1, Some(2)),
            joiner("b", None, 2, Some(0)),
            joiner("c", None, 3, Some(1)),
        ],
        t0,
    );
    assert_eq!(ms.iter().map(|m| m.rank).collect::<Vec<_>>(), vec![2, 0, 1]);
    // Ranks 0, 1, 2 are b, c, a: each gets the next rank's data address only.
    assert_eq!(ms[1].next_data_addr, "c:3");
    assert_eq!(ms[2].next_data_addr, "a:1");
    assert_eq!(ms[0].next_data_addr, "b:2");
    // Three hosts: node ranks follow the lowest rank on each host.
    assert_eq!(ms[1].node_rank, 0);
    assert_eq!(ms[2].node_rank, 1);
    assert_eq!(ms[0].node_rank, 2);
    assert!(ms.iter().all(|m| m.num_nodes == 3 && m.local_size == 1));
}

#[test]
fn duplicate_launcher_ranks_fall_back_to_sorting() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(3), t0).unwrap();
    let ms = join_all(
        &mut s,
        vec![
            joiner("b", Some(0), 7, Some(0)),
            joiner("a", Some(1), 5, Some(0)),
            joiner("a", Some(0), 9, Some(1)),
        ],
        t0,
    );
    // Sorted by (host, local rank, pid): a/0/9, a/1/5, b/0/7.
    assert_eq!(ms.iter().map(|m| m.rank).collect::<Vec<_>>(), vec![2, 1, 0]);
}

#[test]
fn out_of_range_or_partial_launcher_ranks_fall_back_to_sorting() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(2), t0).unwrap();
    let ms =
        join_all(&mut s, vec![joiner("z", None, 1, Some(5)), joiner("a", None, 2, Some(0))], t0);
    assert_eq!(ms[0].rank, 1);
    assert_eq!(ms[1].rank, 0);

    let mut s = CoordinatorState::new(cfg(2), t0).unwrap();
    let ms = join_all(&mut s, vec![joiner("z", None, 1, Some(0)), joiner("a", None, 2, None)], t0);
    assert_eq!((ms[0].rank, ms[1].rank), (1, 0));

    // A launcher that thinks the world is bigger is not trusted either.
    let mut s = CoordinatorState::new(cfg(2), t0).unwrap();
    let mut x = joiner("z", None, 1, Some(0));
    x.launcher_world = Some(4);
    let mut y = joiner("a", None, 2, Some(1));
    y.launcher_world = Some(4);
    let ms = join_all(&mut s, vec![x, y], t0);
    assert_eq!((ms[0].rank, ms[1].rank), (1, 0));
}

#[test]
fn several_hosts_give_local_and_node_ranks() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(5), t0).unwrap();
    let ms = join_all(
        &mut s,
        vec![
            joiner("n2", Some(1), 40, None),
            joiner("n1", Some(1), 30, None),
            joiner("n2", Some(0), 50, None),
            joiner("n1", Some(0), 20, None),
            joiner("n1", Some(2), 10, None),
        ],
        t0,
    );
    let got: Vec<(u32, u32, u32, u32)> =
        ms.iter().map(|m| (m.rank, m.local_rank, m.local_size, m.node_rank)).collect();
    assert_eq!(
        got,
        vec![
            (4, 1, 2, 1), // n2 local 1
            (1, 1, 3, 0), // n1 local 1
            (3, 0, 2, 1), // n2 local 0
            (0, 0, 3, 0), // n1 local 0
            (2, 2, 3, 0), // n1 local 2
        ]
    );
    assert!(ms.iter().all(|m| m.num_nodes == 2 && m.world == 5));
    // The node leaders are the local ranks 0: rank 0 on n1, rank 3 on n2.
    let leaders: Vec<u32> = ms.iter().map(|m| m.node_leader).collect();
    assert_eq!(leaders, vec![3, 0, 3, 0, 0]);
}

/// Five ranks on two hosts: n1 holds ranks 0..3 (leader 0), n2 ranks 3..5 (leader 3).
fn two_nodes(t0: Instant) -> CoordinatorState {
    let mut s = CoordinatorState::new(cfg(5), t0).unwrap();
    let hosts = ["n1", "n1", "n1", "n2", "n2"];
    join_all(
        &mut s,
        (0..5).map(|i| joiner(hosts[i], None, 10 + i as u32, Some(i as u32))).collect(),
        t0,
    );
    s
}

#[test]
fn relayed_heartbeats_keep_each_rank_alive_and_a_silent_rank_is_named_itself() {
    let t0 = Instant::now();
    let mut s = two_nodes(t0);
    let t = |secs: u64| t0 + Duration::from_secs(secs);
    for sec in 1..=12 {
        // Rank 2 stops beating after 3 s: its relay (rank 0) no longer forwards it.
        let node1: Vec<(u32, Option<Progress>)> = if sec <= 3 {
            vec![(0, None), (1, None), (2, None)]
        } else {
            vec![(0, None), (1, None)]
        };
        s.on_relayed_heartbeats(0, &node1, t(sec)).unwrap();
        s.on_relayed_heartbeats(3, &[(3, None), (4, None)], t(sec)).unwrap();
        assert!(s.tick(t(sec)).is_empty(), "second {sec}");
    }
    let d = s.tick(t(13) + Duration::from_millis(200));
    let [Decision::Abort(abort)] = d.as_slice() else { panic!("expected an abort, got {d:?}") };
    assert_eq!(abort.rank, Some(2));
    assert!(
        abort.reason.starts_with("rank 2 (host n1, pid 12) missed its heartbeat budget"),
        "{}",
        abort.reason
    );
}

#[test]
fn a_silent_relay_is_named_not_the_ranks_it_relays() {
    let t0 = Instant::now();
    let mut s = two_nodes(t0);
    let t = |secs: u64| t0 + Duration::from_secs(secs);
    // Node n2's relay (rank 3) forwards rank 4 until second 2 and its own beats until second
    // 3 (rank 4's last beat missed the last batch), then goes silent; node n1 beats on. Rank
    // 4 runs out of budget first, but the relay is the one to name.
    for sec in 1..=14 {
        s.on_relayed_heartbeats(0, &[(0, None), (1, None), (2, None)], t(sec)).unwrap();
        if sec <= 2 {
            // Rank 4's beat listed first: the relay must still be named, whatever the order.
            s.on_relayed_heartbeats(3, &[(4, None), (3, None)], t(sec)).unwrap();
        } else if sec == 3 {
            s.on_relayed_heartbeats(3, &[(3, None)], t(sec)).unwrap();
        }
        let d = s.tick(t(sec) + Duration::from_millis(500));
        if sec <= 12 {
            assert!(d.is_empty(), "second {sec}: {d:?}");
        } else {
            let [Decision::Abort(abort)] = d.as_slice() else { panic!("{d:?}") };
            assert_eq!(abort.rank, Some(3));
            assert!(abort.reason.contains("rank 3 (host n2, pid 13) missed its heartbeat budget"));
            assert!(
                abort.reason.contains("it also relays the heartbeats of 1 other rank of its node"),
                "{}",
                abort.reason
            );
            return;
        }
    }
    panic!("no abort");
}

#[test]
fn a_relay_that_stops_before_forwarding_a_rank_is_named() {
    let t0 = Instant::now();
    let mut s = two_nodes(t0);
    let t = |ms: u64| t0 + Duration::from_millis(ms);
    // Rank 3's first batch holds only its own beat (rank 4 had not connected yet), then it
    // stops; node n1 beats on. Rank 4, never heard from, is the first out of budget.
    s.on_relayed_heartbeats(3, &[(3, None)], t(500)).unwrap();
    for sec in 1..=10 {
        s.on_relayed_heartbeats(0, &[(0, None), (1, None), (2, None)], t(sec * 1000)).unwrap();
        assert!(s.tick(t(sec * 1000)).is_empty(), "second {sec}");
    }
    // Rank 4 is out of budget, its relay not quite yet: wait for the relay's verdict.
    assert!(s.tick(t(10_200)).is_empty());
    let d = s.tick(t(10_600));
    let [Decision::Abort(abort)] = d.as_slice() else { panic!("{d:?}") };
    assert_eq!(abort.rank, Some(3), "{}", abort.reason);
    assert!(abort.reason.contains("relays the heartbeats of 1 other rank"), "{}", abort.reason);
}

#[test]
fn a_relay_may_only_forward_ranks_of_its_own_node() {
    let t0 = Instant::now();
    let mut s = two_nodes(t0);
    let err = s.on_relayed_heartbeats(0, &[(0, None), (4, None)], t0).unwrap_err();
    assert_eq!(err.kind, RefusalKind::InvalidArgument);
    assert!(
        err.message.contains("rank 0 relayed a heartbeat of rank 4, which is on node 1"),
        "{}",
        err.message
    );
    let err = s.on_relayed_heartbeats(0, &[(9, None)], t0).unwrap_err();
    assert!(err.message.contains("rank 9"), "{}", err.message);
}

#[test]
fn config_mismatch_refuses_every_rank_naming_both_hashes() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(3), t0).unwrap();
    let mut odd = joiner("b", None, 2, Some(1));
    odd.config_hash = "cfg-b".into();
    let tickets = vec![
        s.on_join(joiner("a", None, 1, Some(0)), t0).unwrap(),
        s.on_join(odd, t0).unwrap(),
        s.on_join(joiner("c", None, 3, Some(2)), t0).unwrap(),
    ];
    for t in tickets {
        let err = s.join_result(t).unwrap().unwrap_err();
        assert_eq!(err.kind, RefusalKind::FailedPrecondition);
        assert!(err.message.contains("config hash mismatch"), "{}", err.message);
        assert!(
            err.message.contains("launcher rank 1 (host b, pid 2) has config hash cfg-b"),
            "{}",
            err.message
        );
        assert!(err.message.contains("have config hash cfg-a"), "{}", err.message);
    }
    // A late joiner gets the same refusal.
    let late = s.on_join(joiner("d", None, 4, None), t0).unwrap_err();
    assert_eq!(late.kind, RefusalKind::FailedPrecondition);
    assert!(late.message.contains("cfg-b"));
}

#[test]
fn version_mismatch_is_refused() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(2), t0).unwrap();
    let mut odd = joiner("b", None, 2, None);
    odd.version = "0.2.0".into();
    let a = s.on_join(joiner("a", None, 1, None), t0).unwrap();
    s.on_join(odd, t0).unwrap();
    let err = s.join_result(a).unwrap().unwrap_err();
    assert!(err.message.contains("build version mismatch"), "{}", err.message);
    assert!(err.message.contains("0.2.0") && err.message.contains("0.1.0"));
}

#[test]
fn joining_a_full_world_is_refused() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(1), t0).unwrap();
    join_all(&mut s, vec![joiner("a", None, 1, None)], t0);
    let err = s.on_join(joiner("a", None, 2, None), t0).unwrap_err();
    assert_eq!(err.kind, RefusalKind::ResourceExhausted);
    assert!(err.message.contains("the world is full"), "{}", err.message);
}

#[test]
fn join_timeout_names_missing_launcher_ranks() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(4), t0).unwrap();
    let a = s.on_join(joiner("a", None, 1, Some(0)), t0).unwrap();
    s.on_join(joiner("a", None, 2, Some(1)), t0).unwrap();
    assert!(s.tick(t0 + Duration::from_secs(299)).is_empty());
    let d = s.tick(t0 + Duration::from_secs(300));
    let [Decision::Abort(abort)] = d.as_slice() else {
        panic!("expected one abort, got {d:?}");
    };
    assert_eq!(abort.rank, None);
    let err = s.join_result(a).unwrap().unwrap_err();
    assert_eq!(err.kind, RefusalKind::DeadlineExceeded);
    assert!(
        err.message.starts_with("2 of 4 ranks joined after 300s; missing launcher ranks [2, 3]"),
        "{}",
        err.message
    );
    // Later ticks decide nothing new.
    assert!(s.tick(t0 + Duration::from_secs(400)).is_empty());
}

#[test]
fn join_timeout_without_launcher_ranks_counts_missing() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(3), t0).unwrap();
    s.on_join(joiner("a", None, 1, None), t0).unwrap();
    s.tick(t0 + Duration::from_millis(300_500));
    let msg = &s.failure().unwrap().message;
    assert!(msg.starts_with("1 of 3 ranks joined after 300s; 2 ranks missing"), "{msg}");
    assert!(msg.contains("host a pid 1"), "{msg}");
}

#[test]
fn missed_heartbeat_aborts_naming_the_rank() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(3), t0).unwrap();
    join_all(&mut s, (0..3).map(|i| joiner("h", Some(i), 100 + i, Some(i))).collect(), t0);
    let t = |secs: u64| t0 + Duration::from_secs(secs);
    for sec in 1..=12 {
        s.on_heartbeat(0, None, t(sec)).unwrap();
        if sec <= 3 {
            s.on_heartbeat(1, None, t(sec)).unwrap();
        }
        s.on_heartbeat(2, None, t(sec)).unwrap();
        let d = s.tick(t(sec));
        if sec < 14 {
            assert!(d.is_empty(), "second {sec}: {d:?}");
        }
    }
    assert!(s.tick(t(13)).is_empty(), "exactly at the budget is fine");
    let d = s.tick(t(13) + Duration::from_millis(200));
    let [Decision::Abort(abort)] = d.as_slice() else {
        panic!("expected an abort, got {d:?}");
    };
    assert_eq!(abort.rank, Some(1));
    assert!(
        abort
            .reason
            .starts_with("rank 1 (host h, pid 101) missed its heartbeat budget: no heartbeat for 10.2s (budget 10s)"),
        "{}",
        abort.reason
    );
    // Everything afterwards is refused with the reason; heartbeats tell the others.
    let err = s.on_heartbeat(0, None, t(14)).unwrap_err();
    assert_eq!(err.kind, RefusalKind::Aborted);
    assert!(err.message.contains("rank 1"));
    assert!(s.tick(t(30)).is_empty());
}

#[test]
fn finished_ranks_are_never_aborted_and_all_finished_is_done() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(2), t0).unwrap();
    join_all(&mut s, vec![joiner("h", None, 1, None), joiner("h", None, 2, None)], t0);
    assert!(s.on_finish(0).unwrap().is_empty());
    for sec in 1..=60 {
        s.on_heartbeat(1, None, t0 + Duration::from_secs(sec)).unwrap();
        assert!(s.tick(t0 + Duration::from_secs(sec)).is_empty());
    }
    assert_eq!(s.on_finish(1).unwrap(), vec![Decision::Done]);
    assert!(s.is_done());
    assert!(s.tick(t0 + Duration::from_secs(600)).is_empty());
    // A launcher failure after the job is done changes nothing.
    assert!(s.on_launcher_failure(0, "exited with status 1").is_empty());
}

#[test]
fn report_error_aborts_with_the_reason() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(2), t0).unwrap();
    join_all(&mut s, vec![joiner("h", None, 1, None), joiner("h", None, 2, None)], t0);
    let d = s.on_report_error(1, "NaN loss at step 7").unwrap();
    assert_eq!(
        d,
        vec![Decision::Abort(AbortInfo {
            rank: Some(1),
            reason: "rank 1 (host h, pid 2) reported an error: NaN loss at step 7".into()
        })]
    );
    // The first failure wins.
    assert!(s.on_report_error(0, "other").unwrap().is_empty());
    assert_eq!(s.abort_info().unwrap().rank, Some(1));
}

#[test]
fn launcher_failure_maps_launcher_rank_to_rank() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(2), t0).unwrap();
    // The launcher's world (3) is not the coordinator's (2), so ranks come from sorting
    // (host b sorts last).
    let mut x = joiner("b", None, 1, Some(0));
    x.launcher_world = Some(3);
    let mut y = joiner("a", None, 2, Some(1));
    y.launcher_world = Some(3);
    join_all(&mut s, vec![x, y], t0);
    let d = s.on_launcher_failure(1, "exited with status 3");
    let [Decision::Abort(abort)] = d.as_slice() else {
        panic!("{d:?}");
    };
    assert_eq!(abort.rank, Some(0));
    assert_eq!(abort.reason, "rank 0 (host a, pid 2) exited with status 3");
}

#[test]
fn launcher_failure_before_the_world_formed_fails_the_join() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(2), t0).unwrap();
    let a = s.on_join(joiner("a", None, 1, Some(0)), t0).unwrap();
    s.on_launcher_failure(1, "exited with status 1 before joining");
    let err = s.join_result(a).unwrap().unwrap_err();
    assert_eq!(err.kind, RefusalKind::Aborted);
    assert!(err.message.contains("launcher rank 1 exited"), "{}", err.message);
}

#[test]
fn heartbeat_from_unknown_rank_or_before_join_is_refused() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(1), t0).unwrap();
    let e = s.on_heartbeat(0, None, t0).unwrap_err();
    assert_eq!(e.kind, RefusalKind::FailedPrecondition);
    join_all(&mut s, vec![joiner("a", None, 1, None)], t0);
    let e = s.on_heartbeat(3, None, t0).unwrap_err();
    assert_eq!(e.kind, RefusalKind::InvalidArgument);
    assert!(e.message.contains("world has 1 ranks"), "{}", e.message);
}

#[test]
fn progress_keeps_the_latest_report() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(1), t0).unwrap();
    join_all(&mut s, vec![joiner("a", None, 1, Some(0))], t0);
    assert_eq!(s.progress(t0)[0].progress, None);
    let p = Progress { step: 5, loss: Some(1.5), samples: 640, b_simple: Some(250.0) };
    s.on_heartbeat(0, Some(p), t0 + Duration::from_secs(1)).unwrap();
    // A heartbeat without progress keeps the last one.
    s.on_heartbeat(0, None, t0 + Duration::from_secs(2)).unwrap();
    let got = &s.progress(t0 + Duration::from_secs(3))[0];
    assert_eq!(got.progress, Some(p));
    assert_eq!(got.since_heartbeat, Duration::from_secs(1));
    assert_eq!(got.launcher_rank, Some(0));
}

#[test]
fn barrier_rounds_and_missing_ranks() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(3), t0).unwrap();
    join_all(&mut s, (0..3).map(|i| joiner("h", Some(i), i, None)).collect(), t0);
    let a = s.barrier_enter("x", 0).unwrap();
    let b = s.barrier_enter("x", 2).unwrap();
    assert!(!s.barrier_passed(&a));
    assert!(s.barrier_enter("x", 0).is_err(), "twice in a round");
    assert_eq!(s.barrier_leave(&b), vec![1]);
    let b = s.barrier_enter("x", 2).unwrap();
    let c = s.barrier_enter("x", 1).unwrap();
    assert!(s.barrier_passed(&a) && s.barrier_passed(&b) && s.barrier_passed(&c));
    // The name can be reused for a new round.
    let a2 = s.barrier_enter("x", 0).unwrap();
    assert!(!s.barrier_passed(&a2));
}

#[test]
fn store_set_get() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(cfg(1), t0).unwrap();
    assert_eq!(s.store_get("k"), None);
    s.store_set("k", vec![1, 2]).unwrap();
    assert_eq!(s.store_get("k"), Some(&[1u8, 2][..]));
    assert_eq!(s.store_set("", vec![]).unwrap_err().kind, RefusalKind::InvalidArgument);
}

#[test]
fn invalid_config_is_refused() {
    let t0 = Instant::now();
    assert!(CoordinatorState::new(cfg(0), t0).is_err());
    let mut c = cfg(2);
    c.heartbeat_interval = c.heartbeat_timeout;
    let e = CoordinatorState::new(c, t0).unwrap_err();
    assert!(e.message.contains("must be shorter than the heartbeat timeout"), "{}", e.message);
}

#[test]
fn a_join_from_a_stale_generation_is_refused_and_the_world_still_forms() {
    let t0 = Instant::now();
    let mut s = CoordinatorState::new(StateConfig { generation: 3, ..cfg(2) }, t0).unwrap();
    let stale = JoinInfo { generation: Some(2), ..joiner("h", None, 7, Some(0)) };
    let r = s.on_join(stale, t0).unwrap_err();
    assert_eq!(r.kind, RefusalKind::FailedPrecondition);
    assert!(
        r.message.contains("generation 2") && r.message.contains("generation 3"),
        "{}",
        r.message
    );
    assert!(r.message.contains("pid 7"), "{}", r.message);
    // The refusal does not poison the job: the current generation's ranks form the world.
    let ms = join_all(
        &mut s,
        vec![
            JoinInfo { generation: Some(3), ..joiner("h", None, 8, Some(0)) },
            JoinInfo { generation: None, ..joiner("h", None, 9, Some(1)) },
        ],
        t0,
    );
    assert!(ms.iter().all(|m| m.generation == 3));
}
