//! Source addresses for client connections.
//!
//! Towards one server address, one source IP has only as many connections
//! as ephemeral ports; all of 127.0.0.0/8 is loopback, so each worker takes
//! its own second octet and moves to the next 127.o.x.y every
//! `per_address` connections. Workers never share an address, so their
//! ports never collide.

use std::net::Ipv4Addr;

/// Second octet used by the first worker; lower ones are left to other tools.
pub const FIRST_WORKER_OCTET: u8 = 10;
/// Default connections per source address.
pub const DEFAULT_PER_ADDRESS: u32 = 1000;

/// The addresses of one worker.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct SourcePlan {
    /// 127.`octet`.x.y.
    pub octet: u8,
    /// Connections opened from one address before moving to the next.
    pub per_address: u32,
}

impl SourcePlan {
    /// The source address of the worker's `conn`-th connection.
    pub fn address(&self, conn: u32) -> Ipv4Addr {
        let block = conn / self.per_address.max(1);
        // y runs 1..=254 (no .0 or .255); x carries. 65k addresses per
        // worker is far beyond what one process can hold.
        let x = (block / 254) as u8;
        let y = (block % 254) as u8 + 1;
        Ipv4Addr::new(127, self.octet, x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_every_per_address_connections() {
        let plan = SourcePlan { octet: 11, per_address: 1000 };
        assert_eq!(plan.address(0), Ipv4Addr::new(127, 11, 0, 1));
        assert_eq!(plan.address(999), Ipv4Addr::new(127, 11, 0, 1));
        assert_eq!(plan.address(1000), Ipv4Addr::new(127, 11, 0, 2));
        assert_eq!(plan.address(254 * 1000), Ipv4Addr::new(127, 11, 1, 1));
    }
}
