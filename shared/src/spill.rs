//! How traffic spreads over priority tiers: Envoy's priority-level arithmetic.
//!
//! Each tier's health is `min(100 %, healthy_weight / total_weight × overprovisioning)`. Tier 0
//! takes as much traffic as its health, each next tier takes as much of what is left as its own
//! health, and so on. When the health of all tiers adds up to less than 100 %, the shares are
//! scaled up so that all traffic still goes somewhere (Envoy's "normalized total health").
//! With overprovisioning 1.4, a tier keeps all its traffic until more than ~28 % of its weight is
//! unhealthy, which is what lets a tier absorb a few failures before spilling.
//!
//! Loads are in basis points (1/10,000) so that the data plane can pick a tier with integer
//! arithmetic.

/// All traffic, in basis points.
pub const FULL: u32 = 10_000;

/// One tier's weights as the data plane currently sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierHealth {
    pub healthy_weight: u64,
    pub total_weight: u64,
}

/// The share of traffic (basis points) each tier should take. Sums to [`FULL`] when any tier has
/// a healthy backend, and is all zeros when none has.
///
/// `overprovisioning_pct` is the factor in percent (140 for 1.4).
pub fn tier_loads(tiers: &[TierHealth], overprovisioning_pct: u32) -> Vec<u32> {
    let health: Vec<u64> = tiers
        .iter()
        .map(|t| {
            if t.total_weight == 0 {
                0
            } else {
                let h = t.healthy_weight * u64::from(overprovisioning_pct) * u64::from(FULL)
                    / (t.total_weight * 100);
                h.min(u64::from(FULL))
            }
        })
        .collect();
    let total_health = health.iter().sum::<u64>().min(u64::from(FULL));
    let mut loads = vec![0u32; tiers.len()];
    if total_health == 0 {
        return loads;
    }
    let mut left = u64::from(FULL);
    for (load, h) in loads.iter_mut().zip(&health) {
        // Scaling by total_health only changes anything when the tiers together are below 100 %.
        let share = (h * u64::from(FULL) / total_health).min(left);
        *load = share as u32;
        left -= share;
    }
    // Integer division can leave a few basis points over; give them to the first tier that
    // takes traffic, as Envoy does.
    if left > 0 {
        if let Some(first) = loads.iter_mut().find(|l| **l > 0) {
            *first += left as u32;
        }
    }
    loads
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(healthy: u64, total: u64) -> TierHealth {
        TierHealth {
            healthy_weight: healthy,
            total_weight: total,
        }
    }

    #[test]
    fn a_healthy_tier_zero_takes_everything() {
        assert_eq!(tier_loads(&[t(9, 9), t(1, 1)], 140), vec![10_000, 0]);
    }

    #[test]
    fn a_dead_tier_zero_hands_everything_to_tier_one() {
        assert_eq!(tier_loads(&[t(0, 9), t(1, 1)], 140), vec![0, 10_000]);
    }

    #[test]
    fn overprovisioning_absorbs_small_losses() {
        // 3 of 4 equal backends healthy: 75 % × 1.4 = 105 % → still all traffic on tier 0.
        assert_eq!(tier_loads(&[t(3, 4), t(1, 1)], 140), vec![10_000, 0]);
    }

    #[test]
    fn half_a_tier_spills_thirty_percent() {
        // 50 % × 1.4 = 70 % stays, 30 % spills to the next tier.
        assert_eq!(tier_loads(&[t(1, 2), t(1, 1)], 140), vec![7_000, 3_000]);
    }

    #[test]
    fn spill_continues_through_several_tiers() {
        // Tier 0 at 20 % × 1.4 = 28 %, tier 1 at 25 % × 1.4 = 35 %, tier 2 healthy: 37 %.
        assert_eq!(
            tier_loads(&[t(1, 5), t(1, 4), t(2, 2)], 140),
            vec![2_800, 3_500, 3_700]
        );
    }

    #[test]
    fn degraded_everywhere_is_normalized_to_all_traffic() {
        // 10 % × 1.4 = 14 % and 20 % × 1.4 = 28 %: 42 % in all, scaled to 1/3 and 2/3.
        let loads = tier_loads(&[t(1, 10), t(1, 5)], 140);
        assert_eq!(loads.iter().sum::<u32>(), FULL);
        assert_eq!(loads, vec![3_334, 6_666]);
    }

    #[test]
    fn nothing_healthy_means_no_load() {
        assert_eq!(tier_loads(&[t(0, 3), t(0, 1)], 140), vec![0, 0]);
        assert_eq!(tier_loads(&[], 140), Vec::<u32>::new());
    }

    proptest! {
        #[test]
        fn loads_sum_to_all_traffic_when_anything_is_healthy(
            tiers in prop::collection::vec((0u64..50, 1u64..50), 1..6),
            pct in 100u32..400,
        ) {
            let tiers: Vec<_> = tiers.into_iter().map(|(h, tot)| t(h.min(tot), tot)).collect();
            let loads = tier_loads(&tiers, pct);
            let any = tiers.iter().any(|t| t.healthy_weight > 0);
            prop_assert_eq!(loads.iter().sum::<u32>(), if any { FULL } else { 0 });
            for (l, tier) in loads.iter().zip(&tiers) {
                if tier.healthy_weight == 0 {
                    prop_assert_eq!(*l, 0);
                }
            }
        }

        #[test]
        fn a_fully_healthy_tier_leaves_nothing_for_lower_tiers(
            below in prop::collection::vec((0u64..50, 1u64..50), 0..4),
            first in 1u64..50,
        ) {
            let mut tiers = vec![t(first, first)];
            tiers.extend(below.into_iter().map(|(h, tot)| t(h.min(tot), tot)));
            let loads = tier_loads(&tiers, 140);
            prop_assert_eq!(loads[0], FULL);
        }
    }
}
