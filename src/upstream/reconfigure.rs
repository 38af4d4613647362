//! A reload's `[upstream]` applied to a running shard ([`crate::reload`]):
//! limits and timeouts in place, new services and backends get links,
//! removed ones are retired.

use super::*;

impl Upstream {
    /// Applies `new`. Returns the links it added: the shard starts their
    /// tasks. A retired link takes no new request; its task closes it, and
    /// what was in flight on it is answered UNAVAILABLE (as when a backend
    /// connection breaks). Service indexes stay stable: a removed service
    /// keeps its slot, empty, and its id answers "unknown service".
    pub(crate) fn apply_live(&mut self, new: &UpstreamSettings) -> Vec<u32> {
        let mut added = Vec::new();
        let mut kept = Vec::with_capacity(new.services.len());
        for s in &new.services {
            let i = match self.by_id.get(&s.id) {
                Some(&i) => i,
                None => {
                    // Invariant: the config caps services far below u16::MAX.
                    let Ok(i) = u16::try_from(self.services.len()) else { continue };
                    self.services.push(Service {
                        settings: s.clone(),
                        inflight: 0,
                        deadlines: VecDeque::new(),
                        links: Vec::new(),
                        next: 0,
                        events: None,
                    });
                    self.by_id.insert(s.id.clone(), i);
                    i
                }
            };
            kept.push(i);
            let svc = &mut self.services[usize::from(i)];
            svc.settings = s.clone();
            match (s.subscribe_events, svc.events.is_some()) {
                (true, false) => svc.events = Some(EventQueue::default()),
                (false, true) => svc.events = None,
                _ => {}
            }
            // Keep a link per wanted (backend, pool slot) that has one.
            let mut want: Vec<SocketAddr> = (0..s.pool_size).flat_map(|_| s.backends.iter().copied()).collect();
            for id in std::mem::take(&mut svc.links) {
                let addr = self.links.get(id as usize).map(|l| l.addr);
                match addr.and_then(|a| want.iter().position(|w| *w == a)) {
                    Some(p) => {
                        want.swap_remove(p);
                        svc.links.push(id);
                    }
                    None => retire(&mut self.links, id),
                }
            }
            for addr in want {
                let id = self.links.insert(Link::new(i, addr)) as u32;
                svc.links.push(id);
                added.push(id);
            }
            svc.next = 0;
        }
        for (i, svc) in self.services.iter_mut().enumerate() {
            if !kept.iter().any(|&k| usize::from(k) == i) {
                for id in std::mem::take(&mut svc.links) {
                    retire(&mut self.links, id);
                }
                svc.events = None;
            }
        }
        self.by_id.retain(|_, i| kept.contains(i));
        self.settings = new.clone();
        added
    }

    /// Whether link `idx` was retired by a reload (or is gone).
    pub(super) fn is_retired(&self, idx: u32) -> bool {
        self.links.get(idx as usize).is_none_or(|l| l.retired)
    }
}

fn retire(links: &mut Slab<Link>, id: u32) {
    if let Some(l) = links.get_mut(id as usize) {
        l.retired = true;
        l.wake();
    }
}
