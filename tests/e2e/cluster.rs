//! Hafen on a Redis Cluster (UL6; DESIGN "Tenancy", scale-out): every service of the stack
//! and a second messaging replica on the development cluster (`scripts/dev-services.sh
//! cluster`: three masters, three replicas, TLS). Sessions, rate limits and revocations live
//! there; a subscriber on one replica hears of a message sent through the other by sharded
//! pub/sub. Then the master serving the tenant's event channel is killed: while a replica
//! takes over, sends go on being acknowledged, none of them is lost to the subscriber, and
//! the live feed comes back on the new master.

use std::collections::BTreeMap;
use std::time::Duration;

use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::messaging::v1 as msg;
use hafen_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use hafen_testkit::{TestRedisCluster, TestServer, TestStack, eventually, with_token};
use tokio::time::Instant;
use tokio_stream::StreamExt;

/// Starts the killed node again when the test ends, also when it fails.
struct StartAgain<'a>(&'a TestRedisCluster);

impl Drop for StartAgain<'_> {
    fn drop(&mut self) {
        self.0.start_missing_nodes();
    }
}

async fn exists(cluster: &TestRedisCluster, key: &str) -> bool {
    let found: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut cluster.connection())
        .await
        .expect("EXISTS on the cluster");
    found == 1
}

/// The next message the stream delivers within `within`, if any; other events are skipped.
async fn next_message(
    stream: &mut tonic::Streaming<msg::SubscribeResponse>,
    within: Duration,
) -> Option<msg::Message> {
    let deadline = Instant::now() + within;
    loop {
        let item = tokio::time::timeout_at(deadline, stream.next())
            .await
            .ok()?
            .expect("the stream stays open")
            .expect("no error on the stream");
        if let Some(msg::subscribe_response::Event::MessageCreated(m)) = item.event {
            return Some(m);
        }
    }
}

async fn shard_subscribers(cluster: &TestRedisCluster, port: u16, channel: &str) -> i64 {
    let counts: Vec<(String, i64)> = cluster
        .on_node(port, redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(channel))
        .await
        .unwrap_or_default();
    counts.first().map(|(_, n)| *n).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn ul6_hafen_runs_on_a_redis_cluster_and_loses_nothing_when_a_master_fails_over() {
    let cluster = TestRedisCluster::new();
    cluster.wait_healthy(Duration::from_secs(60)).await;
    let redis = cluster.args();
    let prefix = redis.redis_prefix.clone();
    let stack = TestStack::start_with_redis(Some(redis.clone())).await;
    // A second messaging replica that would take a minute to notice anything by polling:
    // what it delivers sooner came through the cluster.
    let mut config = stack.secrets.messaging_config(&stack.db);
    config.auth.auth_endpoint = stack.auth.uri();
    config.audit.audit_endpoint = stack.audit.uri();
    config.redis = redis.clone();
    config.stream_poll = Duration::from_secs(60);
    let replica = TestServer::spawn(|l, s| hafen_messaging::serve(config, l, s)).await;
    let mut on_replica = MessagingServiceClient::new(replica.channel(&stack.secrets).await);
    let sender = stack.messaging_client().await;

    let tenant = stack.create_tenant("cluster").await;
    let tenant_id: uuid::Uuid = tenant.id.parse().unwrap();
    let owner = stack.login_owner(&tenant).await.access_token;
    let conversation = stack.create_channel(&owner, "cluster").await;
    let send = |body: String| {
        let mut sender = sender.clone();
        let request = with_token(
            &owner,
            msg::SendMessageRequest {
                conversation_id: conversation.clone(),
                body,
                request_id: uuid::Uuid::now_v7().to_string(),
            },
        );
        async move { sender.send_message(request).await.map(|r| r.into_inner()) }
    };

    // Sessions: the owner's session is cached in the cluster, in its own slot.
    let (session, _) = hafen_authn::token::parse(&owner).unwrap();
    let session_key = format!("{prefix}session:{{{}}}", session.simple());
    eventually(
        "the session cached in the cluster",
        Duration::from_secs(5),
        || async { exists(&cluster, &session_key).await.then_some(()) },
    )
    .await;

    // Live fan-out: the replica subscribes to the tenant's sharded channel at the master of
    // its slot, and delivers what was sent through the other replica.
    let mut stream = on_replica
        .subscribe(with_token(&owner, msg::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let channel = format!("{prefix}events:{{{}}}", tenant_id.simple());
    let first_master = cluster
        .master_for(&channel)
        .await
        .expect("a live master serves the channel");
    eventually(
        "the replica's shard subscription",
        Duration::from_secs(5),
        || async { (shard_subscribers(&cluster, first_master, &channel).await == 1).then_some(()) },
    )
    .await;
    let mut delivered: BTreeMap<u64, String> = BTreeMap::new();
    for body in ["one", "two", "three"] {
        let sent = send(body.into()).await.unwrap();
        let got = next_message(&mut stream, Duration::from_secs(5))
            .await
            .expect("delivered through the cluster, long before the replica polls");
        assert_eq!(got.message_id, sent.message_id);
        delivered.insert(got.sequence, got.message_id);
    }

    // Failover: the master serving the tenant's channel dies while messages keep coming.
    let _start_again = StartAgain(&cluster);
    let killed_at = Instant::now();
    cluster.kill(first_master).await;
    let mut acknowledged: BTreeMap<u64, String> = BTreeMap::new();
    let mut refused = 0u32;
    let mut slowest_send = Duration::ZERO;
    let mut promoted = None;
    let mut sent_after_promotion = 0;
    while sent_after_promotion < 5 {
        assert!(
            killed_at.elapsed() < Duration::from_secs(45),
            "no replica took over within 45 s"
        );
        let started = Instant::now();
        match send(format!("during failover {}", acknowledged.len())).await {
            Ok(sent) => {
                acknowledged.insert(sent.sequence, sent.message_id);
            }
            Err(_) => refused += 1,
        }
        slowest_send = slowest_send.max(started.elapsed());
        if promoted.is_none() {
            if let Some(port) = cluster.master_for(&channel).await
                && port != first_master
            {
                promoted = Some((port, killed_at.elapsed()));
            }
        } else {
            sent_after_promotion += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (new_master, failover_took) = promoted.unwrap();
    // Every acknowledged message reaches the subscriber, in order, without the stream ending.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.keys().any(|seq| !delivered.contains_key(seq)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = next_message(&mut stream, left).await.unwrap_or_else(|| {
            panic!(
                "acknowledged but not delivered: {:?}",
                acknowledged
                    .keys()
                    .filter(|seq| !delivered.contains_key(seq))
                    .collect::<Vec<_>>()
            )
        });
        if let Some((last, _)) = delivered.last_key_value() {
            assert!(got.sequence > *last, "in order, once each");
        }
        delivered.insert(got.sequence, got.message_id);
    }
    for (sequence, id) in &acknowledged {
        assert_eq!(delivered.get(sequence), Some(id), "message {sequence}");
    }
    let recovered_after = killed_at.elapsed();

    // The live feed is back: the replica subscribed again at the new master, and news
    // arrives through it, not by polling.
    eventually(
        "the shard subscription at the new master",
        Duration::from_secs(10),
        || async { (shard_subscribers(&cluster, new_master, &channel).await == 1).then_some(()) },
    )
    .await;
    let mut slowest_live = Duration::ZERO;
    for body in ["after one", "after two", "after three"] {
        let started = Instant::now();
        let sent = send(body.into()).await.unwrap();
        let got = next_message(&mut stream, Duration::from_secs(5))
            .await
            .expect("delivered through the new master");
        assert_eq!(got.message_id, sent.message_id);
        slowest_live = slowest_live.max(started.elapsed());
    }

    // Revocations: a logout ends the stream on the other replica, and its marker is in the
    // cluster. (That the announcement itself crosses the cluster, the next test shows.)
    let logout = stack
        .auth_client()
        .await
        .logout(with_token(&owner, auth_pb::LogoutRequest {}))
        .await;
    logout.unwrap();
    let ended =
        hafen_testkit::ending_status(&mut stream, "after the logout", Duration::from_secs(10))
            .await;
    assert_eq!(ended.code(), tonic::Code::Unauthenticated);
    assert!(
        exists(
            &cluster,
            &format!("{prefix}revoked:{{{}}}", session.simple())
        )
        .await,
        "the revocation marker is in the cluster"
    );

    // Rate limits: failed logins are counted in the cluster; after the sixth, even the
    // right password waits.
    for _ in 0..5 {
        let failed = stack
            .login(
                &tenant.slug,
                "owner",
                "not the password",
                &tenant.owner_code,
            )
            .await
            .unwrap_err();
        assert_eq!(failed.code(), tonic::Code::Unauthenticated, "{failed:?}");
    }
    let _ = stack
        .login(
            &tenant.slug,
            "owner",
            "not the password",
            &tenant.owner_code,
        )
        .await;
    let waits = stack
        .login(
            &tenant.slug,
            "owner",
            hafen_testkit::OWNER_PASSWORD,
            &tenant.owner_code,
        )
        .await
        .unwrap_err();
    assert_eq!(waits.code(), tonic::Code::ResourceExhausted, "{waits:?}");
    let counted = format!("{prefix}limit:{{login-user:{}:owner}}:count", tenant.slug);
    assert!(
        exists(&cluster, &counted).await,
        "the count is in the cluster"
    );

    eprintln!(
        "cluster failover: master 127.0.0.1:{first_master} killed, 127.0.0.1:{new_master} \
         took over after {:.1} s; {} sends acknowledged meanwhile and after ({refused} \
         refused), slowest {:.0} ms; all delivered {:.1} s after the kill; after it, live \
         delivery within {:.0} ms",
        failover_took.as_secs_f64(),
        acknowledged.len(),
        slowest_send.as_secs_f64() * 1000.0,
        recovered_after.as_secs_f64(),
        slowest_live.as_secs_f64() * 1000.0,
    );
    drop(_start_again);
    cluster.wait_healthy(Duration::from_secs(60)).await;
}

/// Puts a (dummy) cache entry for each of `sessions` into the cluster.
async fn cache_entries(
    cluster: &TestRedisCluster,
    redis: &hafen_authn::Redis,
    sessions: &[uuid::Uuid],
) {
    for session in sessions {
        let _: () = redis::cmd("SET")
            .arg(redis.session_key(*session))
            .arg("entry")
            .arg("EX")
            .arg(60)
            .query_async(&mut cluster.connection())
            .await
            .unwrap();
    }
}

/// What spans slots goes out per slot on a cluster: a revocation of many sessions (each
/// marker beside its entry, the announcements on the revocation channel), clearing their
/// entries, and counters of many subjects, whose replies come back in order.
#[tokio::test(flavor = "multi_thread")]
async fn ul6_writes_across_slots_reach_every_master_of_the_cluster() {
    let cluster = TestRedisCluster::new();
    cluster.wait_healthy(Duration::from_secs(60)).await;
    let redis = hafen_authn::Redis::connect(&cluster.args()).await.unwrap();
    let revocations = hafen_authn::Revocations::new(Duration::from_secs(60));
    let _listening = revocations.listen(redis.clone());
    eventually(
        "following the revocation channel",
        Duration::from_secs(5),
        || async { revocations.following_since() },
    )
    .await;

    let sessions: Vec<uuid::Uuid> = (0..24).map(|_| uuid::Uuid::now_v7()).collect();
    let mut masters = std::collections::BTreeSet::new();
    for session in &sessions {
        let marker = redis.revoked_key(*session);
        assert_eq!(
            cluster.slot_of(&marker).await,
            cluster.slot_of(&redis.session_key(*session)).await,
            "a session's marker and entry share a slot"
        );
        masters.insert(cluster.master_for(&marker).await.unwrap());
    }
    cache_entries(&cluster, &redis, &sessions).await;
    assert_eq!(masters.len(), 3, "the sessions spread over every master");

    redis
        .revoke(
            &sessions,
            hafen_authn::RevokeReason::Logout,
            Duration::from_secs(60),
        )
        .await
        .expect("a revocation across slots");
    for session in &sessions {
        assert!(exists(&cluster, &redis.revoked_key(*session)).await);
        assert!(!exists(&cluster, &redis.session_key(*session)).await);
        eventually(
            "the revocation announced",
            Duration::from_secs(5),
            || async { revocations.reason(*session) },
        )
        .await;
    }

    let keys: Vec<String> = (0..24)
        .map(|i| redis.key(&format!("counter:{i}")))
        .collect();
    let counts: Vec<u64> = redis
        .pipelined(keys.len(), |pipe, i| {
            pipe.incr(&keys[i], i as u64 + 1).expire(&keys[i], 60);
        })
        .await
        .into_iter()
        .map(|replies| {
            let replies = replies.expect("counters across slots");
            redis::from_redis_value_ref(&replies[0]).unwrap()
        })
        .collect();
    assert_eq!(counts, (1..=24).collect::<Vec<u64>>());

    cache_entries(&cluster, &redis, &sessions).await;
    redis.forget_sessions(&sessions).await.unwrap();
    for session in &sessions {
        assert!(!exists(&cluster, &redis.session_key(*session)).await);
    }
}

/// On a single server the groups go out as one pipeline; each still gets its own replies.
#[tokio::test(flavor = "multi_thread")]
async fn ul6_pipelined_groups_keep_their_own_replies_on_a_single_server() {
    let ns = hafen_testkit::TestRedis::new();
    let redis = hafen_authn::Redis::connect(&ns.args()).await.unwrap();
    let key = |i: usize| redis.key(&format!("counter:{i}"));
    // Groups of one, two and three commands.
    let replies = redis
        .pipelined(3, |pipe, i| {
            for n in 0..=i {
                pipe.incr(key(i), n + 1);
            }
        })
        .await;
    let counts: Vec<Vec<u64>> = replies
        .into_iter()
        .map(|group| {
            group
                .unwrap()
                .iter()
                .map(|reply| redis::from_redis_value_ref(reply).unwrap())
                .collect()
        })
        .collect();
    assert_eq!(counts, vec![vec![1], vec![1, 3], vec![1, 3, 6]]);
    let empty = redis.pipelined(2, |_, _| {}).await;
    assert!(empty.iter().all(|group| group.as_ref().unwrap().is_empty()));
}
