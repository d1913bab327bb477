//! The round-robin sequence of one tier: smooth weighted round robin, precomputed.
//!
//! The data plane picks a backend by indexing this sequence with one atomic counter, so all the
//! thought goes here, once per table install, and none into the request path.
//!
//! The sequence is nginx's smooth weighted round robin (every step each backend's "current"
//! grows by its weight and the largest one is picked and lowered by the total) with one
//! correction: nginx's sequence sometimes gives a backend two picks in a row although another
//! backend could have taken one of them (for weights 2/2/3/1/8 inside one cycle, and often across
//! the point where the cycle wraps, as with 2/1/1/1/1). Because the data plane replays the cycle
//! forever, the wrap counts too. So at each step:
//! 1. the previous pick is excluded unless it holds more than half of what is left (then repeats
//!    are unavoidable and nginx's order decides where they fall);
//! 2. a backend that needs every other remaining slot (counting the wrap back to the first pick)
//!    is taken now;
//! 3. otherwise the nginx choice (largest current, lowest index on ties) among backends with
//!    picks left in this cycle.
//!
//! For common weights this is nginx's sequence exactly (5/3/1 gives `a b a c a b a b a`); where
//! two backends each need every other slot it may place a light backend elsewhere in the cycle.
//! Each backend gets exactly `weight / gcd` entries per cycle, and no backend is ever two picks
//! away from its exact share at any point of the cycle (nginx's own bound is one); both are
//! property-tested below.

/// Divide every weight by their greatest common divisor: 10/20/30 schedules like 1/2/3.
pub fn reduce_weights(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd);
    if g <= 1 {
        return weights.to_vec();
    }
    weights.iter().map(|w| w / g).collect()
}

/// Length of the schedule for these weights: the sum of the reduced weights.
pub fn schedule_len(weights: &[u32]) -> u64 {
    reduce_weights(weights).iter().map(|&w| u64::from(w)).sum()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The smooth weighted round-robin cycle for `weights` (indices into `weights`).
///
/// Weights are reduced by their gcd first. Zero weights are never picked. Callers bound the
/// input (see [`crate::limits::MAX_SCHEDULE_LEN`]); the cost is O(len × weights.len()).
pub fn smooth_weighted(weights: &[u32]) -> Vec<u32> {
    let w = reduce_weights(weights);
    let n = w.len();
    let total: i64 = w.iter().map(|&x| i64::from(x)).sum();
    if total == 0 {
        return Vec::new();
    }
    // Equal weights: plain round robin is both nginx's answer and the smoothest one.
    if w.iter().all(|&x| x == w[0]) {
        return (0..n as u32).filter(|_| w[0] > 0).collect();
    }
    let mut current = vec![0i64; n];
    let mut left: Vec<i64> = w.iter().map(|&x| i64::from(x)).collect();
    let mut seq = Vec::with_capacity(total as usize);
    let mut prev: Option<usize> = None;
    let mut first: Option<usize> = None;
    for step in 0..total {
        // Remaining picks, with the first pick counted once more: the cycle's last entry must
        // also differ from its first, because the cycle repeats.
        let remaining = total - step + i64::from(first.is_some());
        let left_of = |i: usize, left: &[i64]| left[i] + i64::from(first == Some(i));
        let prev_over_half = prev.is_some_and(|p| 2 * left_of(p, &left) > remaining + 1);

        let mut best: Option<usize> = None;
        let mut critical: Option<usize> = None;
        for i in 0..n {
            current[i] += i64::from(w[i]);
            if left[i] == 0 || (prev == Some(i) && !prev_over_half) {
                continue;
            }
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
            if prev != Some(i) && 2 * left_of(i, &left) >= remaining {
                let more = critical.is_none_or(|c| {
                    (left_of(i, &left), current[i]) > (left_of(c, &left), current[c])
                });
                if more {
                    critical = Some(i);
                }
            }
        }
        let pick = match (critical, best) {
            (Some(c), _) if !prev_over_half => c,
            (_, Some(b)) => b,
            // Only the previous backend has picks left: the repeat is forced.
            _ => prev.unwrap_or(0),
        };
        current[pick] -= total;
        left[pick] -= 1;
        seq.push(pick as u32);
        prev = Some(pick);
        first.get_or_insert(pick);
    }
    seq
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// nginx's algorithm exactly as it runs in `ngx_http_upstream_get_peer`, as a reference.
    fn nginx(weights: &[u32]) -> Vec<u32> {
        let total: i64 = weights.iter().map(|&x| i64::from(x)).sum();
        let mut cur = vec![0i64; weights.len()];
        (0..total)
            .map(|_| {
                let mut best = 0;
                for i in 0..weights.len() {
                    cur[i] += i64::from(weights[i]);
                    if cur[i] > cur[best] {
                        best = i;
                    }
                }
                cur[best] -= total;
                best as u32
            })
            .collect()
    }

    fn counts(seq: &[u32], n: usize) -> Vec<u32> {
        let mut c = vec![0; n];
        for &i in seq {
            c[i as usize] += 1;
        }
        c
    }

    /// Back-to-back picks of each backend, counting the wrap from the last entry to the first.
    fn cyclic_repeats(seq: &[u32], n: usize) -> Vec<u64> {
        let mut r = vec![0; n];
        for k in 0..seq.len() {
            if seq[k] == seq[(k + 1) % seq.len()] {
                r[seq[k] as usize] += 1;
            }
        }
        r
    }

    #[test]
    fn weights_5_3_1_match_nginx_and_split_900_requests_500_300_100() {
        let seq = smooth_weighted(&[5, 3, 1]);
        assert_eq!(seq, vec![0, 1, 0, 2, 0, 1, 0, 1, 0]);
        assert_eq!(seq, nginx(&[5, 3, 1]));
        let mut c = [0u32; 3];
        for k in 0..900 {
            c[seq[k % seq.len()] as usize] += 1;
        }
        assert_eq!(c, [500, 300, 100]);
    }

    #[test]
    fn nginx_wrap_repeat_is_avoided() {
        // nginx gives 0 1 2 3 4 0: backend 0 twice in a row when the cycle wraps.
        assert_eq!(nginx(&[2, 1, 1, 1, 1]), vec![0, 1, 2, 3, 4, 0]);
        let seq = smooth_weighted(&[2, 1, 1, 1, 1]);
        assert_eq!(cyclic_repeats(&seq, 5), vec![0; 5]);
    }

    #[test]
    fn weights_are_reduced_by_their_gcd() {
        assert_eq!(smooth_weighted(&[10, 20, 30]), smooth_weighted(&[1, 2, 3]));
        assert_eq!(schedule_len(&[1000, 1000]), 2);
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        assert_eq!(smooth_weighted(&[7, 7, 7, 7]), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_dominant_backend_spreads_its_unavoidable_repeats() {
        let seq = smooth_weighted(&[1, 10]);
        // 9 repeats are forced; the light backend sits in the middle, like nginx puts it.
        assert_eq!(cyclic_repeats(&seq, 2), vec![0, 9]);
        assert_eq!(seq, nginx(&[1, 10]));
    }

    #[test]
    fn empty_and_single() {
        assert!(smooth_weighted(&[]).is_empty());
        assert_eq!(smooth_weighted(&[5]), vec![0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn every_cycle_gives_each_backend_exactly_its_reduced_weight(
            weights in prop::collection::vec(1u32..60, 1..9)
        ) {
            let seq = smooth_weighted(&weights);
            prop_assert_eq!(counts(&seq, weights.len()), reduce_weights(&weights));
        }

        #[test]
        fn no_backend_gets_two_in_a_row_when_another_could_take_it(
            weights in prop::collection::vec(1u32..60, 1..9)
        ) {
            let w = reduce_weights(&weights);
            let total: i64 = w.iter().map(|&x| i64::from(x)).sum();
            let seq = smooth_weighted(&weights);
            for (i, &r) in cyclic_repeats(&seq, w.len()).iter().enumerate() {
                // A backend with more than half the cycle must repeat 2w - total times; no one
                // else ever has to.
                let forced = (2 * i64::from(w[i]) - total).max(0) as u64;
                prop_assert_eq!(r, forced, "backend {} of {:?}: {:?}", i, w, seq);
            }
        }

        #[test]
        fn every_prefix_stays_within_two_picks_of_the_exact_share(
            weights in prop::collection::vec(1u32..60, 1..9)
        ) {
            let w = reduce_weights(&weights);
            let total: f64 = w.iter().map(|&x| f64::from(x)).sum();
            let seq = smooth_weighted(&weights);
            let mut got = vec![0f64; w.len()];
            for (t, &pick) in seq.iter().enumerate() {
                got[pick as usize] += 1.0;
                for i in 0..w.len() {
                    let share = (t as f64 + 1.0) * f64::from(w[i]) / total;
                    prop_assert!((share - got[i]).abs() < 2.0, "backend {} at step {}", i, t);
                }
            }
        }
    }
}
