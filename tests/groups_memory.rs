//! Group membership memory (issue 15 item 4): what the shard's `Groups`
//! keeps per member, counted by the tracking allocator. The layout it
//! replaced (a hash set per group, a map of boxed group names per session)
//! kept ~150 B per member before allocator overhead; the target is 8-16 B.

use longlink::fuzz_checks::alloc::{TrackingAlloc, measure};
use longlink::groups::Groups;

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

const MEMBERS: u32 = 19_000;

#[test]
fn a_member_of_one_group_costs_at_most_24_bytes() {
    let (groups, usage) = measure(|| {
        let mut g = Groups::default();
        for slot in 0..MEMBERS {
            g.join(slot, "bench-fanout", 8).expect("join");
        }
        g
    });
    let usage = usage.expect("the tracking allocator is installed");
    let per_member = usage.live as f64 / f64::from(MEMBERS);
    eprintln!("{per_member:.1} B per member ({} B live, peak {} B)", usage.live, usage.peak);
    assert_eq!(groups.count("bench-fanout"), MEMBERS as usize);
    assert!(per_member <= 24.0, "{per_member:.1} B per member ({} B live)", usage.live);
}

#[test]
fn members_of_a_few_groups_each_stay_small_and_leave_nothing_behind() {
    let (mut groups, usage) = measure(|| {
        let mut g = Groups::default();
        for slot in 0..MEMBERS {
            g.join(slot, "all", 8).expect("join");
            g.join(slot, if slot % 2 == 0 { "even" } else { "odd" }, 8).expect("join");
        }
        g
    });
    let usage = usage.expect("the tracking allocator is installed");
    // Two memberships per session: the second lives in the overflow map
    // (a hash map entry and a one-element vector), so more than the first.
    let per_membership = usage.live as f64 / f64::from(2 * MEMBERS);
    eprintln!("{per_membership:.1} B per membership");
    assert!(per_membership <= 64.0, "{per_membership:.1} B per membership");
    for slot in 0..MEMBERS {
        groups.leave_all(slot);
    }
    assert_eq!((groups.group_count(), groups.session_count()), (0, 0));
}
