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

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// What building the cycle costs: its length and the number of distinct non-zero weights.
///
/// Backends of equal weight take their turns in index order, so the builder steps over groups
/// of equal weight rather than over backends, and its work is `len × groups`. A 10,000-backend
/// tier with weights 1–4 is 4 groups, whatever the number of backends.
pub fn schedule_cost(weights: &[u32]) -> (u64, u64) {
    let w = reduce_weights(weights);
    let mut distinct: Vec<u32> = w.iter().copied().filter(|&x| x > 0).collect();
    distinct.sort_unstable();
    distinct.dedup();
    (w.iter().map(|&x| u64::from(x)).sum(), distinct.len() as u64)
}

/// Backends of one weight. They have equal `current` whenever they have been picked equally
/// often, and nginx's rule takes the lowest index on a tie, so they are picked in index order:
/// every member has been picked `round` times, plus once more for those before `next`, and the
/// group's next pick is `members[next]`. That is all the state a group needs.
struct Group {
    weight: i64,
    members: Vec<u32>,
    round: i64,
    next: usize,
}

impl Group {
    /// Picks so far of the member at `pos`.
    fn picks_of(&self, pos: usize) -> i64 {
        self.round + i64::from(pos < self.next)
    }
    fn advance(&mut self) {
        self.next += 1;
        if self.next == self.members.len() {
            self.next = 0;
            self.round += 1;
        }
    }
}

/// The cycles that need no stepping: none for no weight, and for equal weights plain round
/// robin, both nginx's answer and the smoothest one. `w` is reduced, `total` its sum.
fn trivial_cycle(w: &[u32], total: i64) -> Option<Vec<u32>> {
    if total == 0 {
        return Some(Vec::new());
    }
    w.iter()
        .all(|&x| x == w[0])
        .then(|| (0..w.len() as u32).collect())
}

/// The smooth weighted round-robin cycle for `weights` (indices into `weights`).
///
/// Weights are reduced by their gcd first. Zero weights are never picked. Callers bound the
/// input (see [`crate::limits::MAX_SCHEDULE_LEN`]); the cost is O(len × distinct weights), see
/// [`schedule_cost`].
pub fn smooth_weighted(weights: &[u32]) -> Vec<u32> {
    let w = reduce_weights(weights);
    let n = w.len();
    let total: i64 = w.iter().map(|&x| i64::from(x)).sum();
    if let Some(cycle) = trivial_cycle(&w, total) {
        return cycle;
    }
    let mut groups: Vec<Group> = Vec::new();
    let mut by_weight: Vec<(u32, u32)> = (0..n as u32)
        .filter(|&i| w[i as usize] > 0)
        .map(|i| (w[i as usize], i))
        .collect();
    by_weight.sort_unstable();
    for (weight, i) in by_weight {
        match groups.last_mut() {
            Some(g) if g.weight == i64::from(weight) => g.members.push(i),
            _ => groups.push(Group {
                weight: i64::from(weight),
                members: vec![i],
                round: 0,
                next: 0,
            }),
        }
    }

    let mut seq = Vec::with_capacity(total as usize);
    // The previous pick as (group, position) and the first pick as a backend index.
    let mut prev: Option<(usize, usize)> = None;
    let mut first: Option<u32> = None;
    for step in 0..total {
        // `current` of a backend after this step's increase: every step adds its weight, every
        // pick took away the total.
        let t = step + 1;
        // Remaining picks, with the first pick counted once more: the cycle's last entry must
        // also differ from its first, because the cycle repeats.
        let remaining = total - step + i64::from(first.is_some());
        let left_of = |g: &Group, pos: usize| {
            g.weight - g.picks_of(pos) + i64::from(first == Some(g.members[pos]))
        };
        let prev_over_half =
            prev.is_some_and(|(g, pos)| 2 * left_of(&groups[g], pos) > remaining + 1);

        // Within a group only its next member can be the best or the critical one: it has the
        // fewest picks, so the largest `current` and the most left (a member counted once more
        // for being first ties on what is left and loses on `current`).
        let mut best: Option<(i64, u32, usize)> = None;
        let mut critical: Option<((i64, i64), u32, usize)> = None;
        for (gi, g) in groups.iter().enumerate() {
            if g.round == g.weight {
                continue;
            }
            let pos = g.next;
            let index = g.members[pos];
            let is_prev = prev == Some((gi, pos));
            if is_prev && !prev_over_half {
                continue;
            }
            let current = t * g.weight - total * g.round;
            // Largest current, then lowest index: nginx's choice.
            if best.is_none_or(|(c, i, _)| current > c || (current == c && index < i)) {
                best = Some((current, index, gi));
            }
            let left = left_of(g, pos);
            if !is_prev && 2 * left >= remaining {
                let key = (left, current);
                if critical.is_none_or(|(k, i, _)| key > k || (key == k && index < i)) {
                    critical = Some((key, index, gi));
                }
            }
        }
        let gi = match (critical, best) {
            (Some((_, _, c)), _) if !prev_over_half => c,
            (_, Some((_, _, b))) => b,
            // Only the previous backend has picks left: the repeat is forced.
            _ => prev.map_or(0, |(g, _)| g),
        };
        let g = &mut groups[gi];
        let pos = g.next;
        g.advance();
        seq.push(g.members[pos]);
        prev = Some((gi, pos));
        first.get_or_insert(g.members[pos]);
    }
    seq
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The cycle computed backend by backend, O(len × backends): the definition the grouped
    /// builder must reproduce entry for entry.
    fn per_backend(weights: &[u32]) -> Vec<u32> {
        let w = reduce_weights(weights);
        let n = w.len();
        let total: i64 = w.iter().map(|&x| i64::from(x)).sum();
        if let Some(cycle) = trivial_cycle(&w, total) {
            return cycle;
        }
        let mut current = vec![0i64; n];
        let mut left: Vec<i64> = w.iter().map(|&x| i64::from(x)).collect();
        let mut seq = Vec::with_capacity(total as usize);
        let mut prev: Option<usize> = None;
        let mut first: Option<usize> = None;
        for step in 0..total {
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
        assert_eq!(schedule_cost(&[1000, 1000]).0, 2);
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

    #[test]
    fn ten_thousand_backends_of_four_weights_are_four_groups() {
        let weights: Vec<u32> = (0..10_000).map(|i| 1 + i % 4).collect();
        assert_eq!(schedule_cost(&weights), (25_000, 4));
        assert_eq!(schedule_cost(&[10, 20, 30, 0]), (6, 3));
        let seq = smooth_weighted(&weights);
        assert_eq!(counts(&seq, weights.len()), weights);
        // The heaviest backends hold 4 of 25,000 slots each: no repeats at all.
        assert_eq!(cyclic_repeats(&seq, weights.len()).iter().sum::<u64>(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn grouping_by_weight_changes_no_entry(
            weights in prop::collection::vec(0u32..60, 1..12)
        ) {
            prop_assert_eq!(smooth_weighted(&weights), per_backend(&weights));
        }

        #[test]
        fn grouping_by_weight_changes_no_entry_with_many_backends_per_weight(
            weights in prop::collection::vec(prop::sample::select(vec![1u32, 2, 3, 5, 40]), 1..150)
        ) {
            prop_assert_eq!(smooth_weighted(&weights), per_backend(&weights));
        }

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
