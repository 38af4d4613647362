//! The contexts the shard gives its feature components beside delivery
//! (the push port, upstream, cluster): each borrows the shard and its state
//! for one call, like [`super::hosts`].

use super::hosts::ShardCtx;
use super::*;
use crate::cluster::{ClusterHost, ClusterShard, LateAnswers};
use crate::push::{PortEvent, PortHost, PortShard};
use crate::upstream::{UpstreamHost, UpstreamShard};

impl PortHost for ShardCtx<'_> {
    fn port(&mut self) -> &mut PushPort {
        &mut self.st.port
    }

    fn shard_id(&self) -> ShardId {
        self.shard.id
    }

    fn shards(&self) -> u16 {
        self.shard.shards()
    }

    fn now(&self) -> Now {
        self.shard.now()
    }

    fn limits(&self) -> PushLimits {
        self.shard.live().push
    }

    fn port_auth(&self) -> Arc<crate::push::auth::PortAuth> {
        self.shard.live().push_auth.clone()
    }

    fn max_frame_bytes(&self) -> u32 {
        self.shard.cfg.max_frame_bytes
    }

    fn count(&self, event: PortEvent) {
        let c = &self.shard.counters;
        let counter = match event {
            PortEvent::Request => &c.push_requests,
            PortEvent::Refused => &c.push_refused,
            PortEvent::Denied => &c.push_denied,
            PortEvent::AuthTimeout => &c.push_auth_timeouts,
            PortEvent::Timeout => &c.push_timeouts,
            PortEvent::LateAnswer => &c.push_late_answers,
            PortEvent::RequestError(code) => return c.ops.request_error(code),
            PortEvent::Answered(after) => return c.ops.push_latency.record(after),
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn next_token(&mut self) -> u64 {
        self.st.next_token()
    }

    fn next_message_id(&mut self) -> u64 {
        self.shard.next_message_id(self.st)
    }

    fn route(&mut self, to: ShardId, msg: ShardMsg) {
        self.shard.route(self.st, to, msg);
    }

    fn reserve_broadcast(&self, frame_len: usize) -> Result<(), String> {
        self.shard.reserve_broadcast(frame_len)
    }

    fn store_is_shared(&mut self) -> bool {
        self.st.reliable.store_is_shared()
    }

    fn mesh_congested(&self, waker: &Waker) -> bool {
        self.shard.mesh_congested(waker)
    }

    fn upgrading(&self) -> bool {
        self.shard.upgrade.quiescing()
    }

    fn cluster_takes(&mut self, backend: ConnKey, frame: Frame) -> Option<Frame> {
        let shard = self.shard;
        crate::cluster::intercept(shard, self, backend, frame)
    }

    fn local_part(&mut self, backend: ConnKey, frame: Frame) -> Option<Frame> {
        crate::cluster::local_reply(self.shard, backend, frame)
    }
}

impl PortShard for Shard {
    type Host<'a> = ShardCtx<'a>;

    fn enter<R>(&self, f: impl FnOnce(&mut ShardCtx<'_>) -> R) -> R {
        let out = f(&mut self.ctx(&mut self.state.borrow_mut()));
        // The cluster's tasks for requests taken in `f`, now that the
        // state is free.
        crate::cluster::start_queued(self);
        out
    }

    fn accept_or_stop(
        &self,
        listener: &glommio::net::TcpListener,
    ) -> impl Future<Output = Option<glommio::Result<TcpStream, ()>>> {
        Shard::accept_or_stop(self, listener)
    }
}

impl UpstreamHost for ShardCtx<'_> {
    fn upstream(&mut self) -> &mut Upstream {
        &mut self.st.upstream
    }

    fn counters(&self) -> &UpstreamCounters {
        &self.shard.counters.upstream
    }

    fn parts(&mut self) -> (&mut Upstream, &UpstreamCounters) {
        (&mut self.st.upstream, &self.shard.counters.upstream)
    }

    fn with_device(&mut self, key: ConnKey) -> (&mut Upstream, Option<&str>) {
        let st = &mut *self.st;
        let device = st.conns.get(key.index as usize).filter(|c| c.generation == key.generation).and_then(Conn::device);
        (&mut st.upstream, device)
    }

    fn device_of(&self, key: ConnKey) -> Option<&str> {
        self.st.device_of(key)
    }

    fn shard_id(&self) -> ShardId {
        self.shard.id
    }

    fn now(&self) -> Now {
        self.shard.now()
    }

    fn max_frame_bytes(&self) -> u32 {
        self.shard.cfg.max_frame_bytes
    }

    fn conn_info(&self, key: ConnKey) -> Option<proto::ConnInfo> {
        self.st.conn_info(self.shard.id, &self.shard.cfg.node, key)
    }

    fn respond(&mut self, key: ConnKey, frame: Bytes) -> bool {
        ShardCtx::respond(self, key, frame)
    }

    fn flush_responses(&mut self, keys: &[ConnKey]) {
        ShardCtx::flush_responses(self, keys);
    }

    fn resume(&mut self, key: ConnKey) {
        ShardCtx::resume_input(self, key);
        self.st.wake_conn(key);
    }

    fn close_conn(&mut self, key: ConnKey, now: Now, code: ErrorCode, reason: String) {
        ShardCtx::close_conn(self, key, now, code, reason);
    }
}

impl UpstreamShard for Shard {
    type Host<'a> = ShardCtx<'a>;

    fn enter<R>(&self, f: impl FnOnce(&mut ShardCtx<'_>) -> R) -> R {
        let mut st = self.state.borrow_mut();
        f(&mut self.ctx(&mut st))
    }
}

impl ClusterHost for ShardCtx<'_> {
    fn device_of(&self, key: ConnKey) -> Option<&str> {
        self.st.device_of(key)
    }

    fn revocation_keep_secs(&self) -> i64 {
        self.st.revoked.keep_secs()
    }

    fn await_revocations(&mut self) {
        self.st.revoked.await_load();
    }

    fn close_conn(&mut self, key: ConnKey, now: Now, code: ErrorCode, reason: String) {
        ShardCtx::close_conn(self, key, now, code, reason);
    }
}

impl ClusterShard for Shard {
    type Host<'a> = ShardCtx<'a>;
    type Drain = ShardDrain;

    fn enter<R>(&self, f: impl FnOnce(&mut ShardCtx<'_>) -> R) -> R {
        let mut st = self.state.borrow_mut();
        f(&mut self.ctx(&mut st))
    }

    fn slot(&self) -> &crate::cluster::Slot<Shard> {
        &self.cluster
    }

    fn me(&self) -> Option<Rc<Shard>> {
        self.me.upgrade()
    }

    fn id(&self) -> ShardId {
        self.id
    }

    fn node(&self) -> &str {
        &self.cfg.node
    }

    fn is_stopping(&self) -> bool {
        Shard::is_stopping(self)
    }

    fn limits(&self) -> PushLimits {
        self.live().push
    }

    fn late_answers(&self) -> LateAnswers {
        let counters = self.counters.clone();
        Rc::new(move || {
            counters.push_late_answers.fetch_add(1, Ordering::Relaxed);
        })
    }

    fn after_store<T: 'static>(
        &self,
        h: &mut ShardCtx<'_>,
        fut: impl Future<Output = T> + 'static,
        then: impl for<'b> FnOnce(&Shard, &mut ShardCtx<'b>, T) + 'static,
    ) {
        Shard::after_store(self, h.st, fut, move |shard, st, value| then(shard, &mut shard.ctx(st), value));
    }

    fn new_drain(rate_per_shard: f64) -> ShardDrain {
        ShardDrain::new(rate_per_shard)
    }

    fn drain_step(&self, drain: &ShardDrain, tick: Duration, endpoint: impl Fn(&str) -> String) -> u32 {
        Shard::drain_step(self, drain, tick, endpoint)
    }
}
