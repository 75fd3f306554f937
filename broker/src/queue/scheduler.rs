//! The lane scheduler: which lane the next delivery comes from.
//!
//! Public so that the benches can measure the pick alone; the broker's
//! delivery loop (`Queue::dispatch`) is its one user.

/// Lanes supported by a [`LaneScheduler`] (its candidate set is a bit mask);
/// the broker's [`LANES_MAX`](crate::limits::LANES_MAX) is below it.
const SCHEDULER_LANES_MAX: usize = u64::BITS as usize;

const _: () = assert!(crate::limits::LANES_MAX <= SCHEDULER_LANES_MAX);

/// Picks the lane to serve next, among the lanes that have something to
/// deliver. Lane 0 is the highest priority.
///
/// - Weighted (the default): smooth weighted round-robin. Each pick, every
///   lane still in the running adds its weight to its credit; the lane with
///   the most credit wins (the lowest index on a tie) and gives back the sum
///   of the weights in the running. With all lanes ready, weights 4:2:1 serve
///   4:2:1 in every 7 picks, interleaved (`0 1 0 2 0 1 0`); every lane with
///   a weight of at least 1 is served within `sum(weights)` picks, so none
///   starves.
/// - Strict: the lowest-index lane with something to deliver, always.
///
/// A lane found with nothing to deliver drops out of the pick and its
/// credit resets to 0: an empty lane accrues no weight to spend later. The
/// pick that chose it is undone first, so the lanes still in the running
/// add their weight once per delivery, not once per lane tried: the ready
/// lanes share the deliveries by their weights (4:1 for high and low when
/// normal is empty, not 4.25:1).
#[derive(Debug, Clone)]
pub struct LaneScheduler {
    weights: Vec<u32>,
    strict: bool,
    /// Smooth weighted round-robin credit per lane.
    current: Vec<i64>,
}

impl LaneScheduler {
    /// A scheduler over `weights.len()` lanes; `strict` ignores the weights.
    ///
    /// # Panics
    ///
    /// With no lanes or more than 64 (queue settings allow 1 to
    /// [`LANES_MAX`](crate::limits::LANES_MAX)).
    pub fn new(weights: &[u32], strict: bool) -> LaneScheduler {
        assert!(
            (1..=SCHEDULER_LANES_MAX).contains(&weights.len()),
            "a scheduler serves 1..={SCHEDULER_LANES_MAX} lanes; got {}",
            weights.len()
        );
        LaneScheduler { weights: weights.to_vec(), strict, current: vec![0; weights.len()] }
    }

    pub fn lane_count(&self) -> usize {
        self.weights.len()
    }

    /// Serves one delivery: picks a lane, calls `take(lane)`; if that finds
    /// nothing, the lane drops out (its credit reset to 0) and the pick
    /// repeats over the rest, until a lane gives something (returned with
    /// the lane) or every lane came up empty (`None`).
    pub fn serve<T>(&mut self, mut take: impl FnMut(usize) -> Option<T>) -> Option<(usize, T)> {
        let mut candidates = u64::MAX >> (SCHEDULER_LANES_MAX - self.weights.len());
        while candidates != 0 {
            let lane = self.pick(candidates);
            if let Some(taken) = take(lane) {
                return Some((lane, taken));
            }
            self.unpick(candidates, lane);
            self.current[lane] = 0;
            candidates &= !(1 << lane);
        }
        None
    }

    /// Picks among `candidates` (a non-empty bit mask of lanes).
    fn pick(&mut self, candidates: u64) -> usize {
        debug_assert_ne!(candidates, 0);
        if self.strict {
            return candidates.trailing_zeros() as usize;
        }
        let mut total = 0;
        let mut best = None;
        for lane in lanes(candidates) {
            let weight = i64::from(self.weights[lane]);
            total += weight;
            self.current[lane] += weight;
            // Strictly more: a tie keeps the lower lane, seen first.
            if best.is_none_or(|b: usize| self.current[lane] > self.current[b]) {
                best = Some(lane);
            }
        }
        let best = best.expect("candidates is not empty");
        self.current[best] -= total;
        best
    }

    /// Undoes `pick(candidates)` that returned `best`.
    fn unpick(&mut self, candidates: u64, best: usize) {
        if self.strict {
            return;
        }
        let mut total = 0;
        for lane in lanes(candidates) {
            let weight = i64::from(self.weights[lane]);
            total += weight;
            self.current[lane] -= weight;
        }
        self.current[best] += total;
    }
}

/// The lanes in a bit mask, lowest first.
fn lanes(mask: u64) -> impl Iterator<Item = usize> {
    let mut rest = mask;
    std::iter::from_fn(move || {
        (rest != 0).then(|| {
            let lane = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            lane
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lanes served over `picks` deliveries when `ready(pick, lane)` says
    /// which lanes have something.
    fn run(scheduler: &mut LaneScheduler, picks: usize, ready: impl Fn(usize, usize) -> bool) -> Vec<Option<usize>> {
        (0..picks).map(|i| scheduler.serve(|lane| ready(i, lane).then_some(())).map(|(lane, ())| lane)).collect()
    }

    fn counts(served: &[Option<usize>], lanes: usize) -> Vec<usize> {
        (0..lanes).map(|l| served.iter().filter(|&&s| s == Some(l)).count()).collect()
    }

    #[test]
    fn weights_4_2_1_serve_4_2_1_in_every_7_picks() {
        let mut scheduler = LaneScheduler::new(&[4, 2, 1], false);
        let served = run(&mut scheduler, 70, |_, _| true);
        for round in served.chunks(7) {
            assert_eq!(counts(round, 3), [4, 2, 1], "{round:?}");
        }
        // Smooth: interleaved, not 0 0 0 0 1 1 2.
        assert_eq!(served[..7], [0, 1, 0, 2, 0, 1, 0].map(Some));
    }

    #[test]
    fn a_lane_with_nothing_is_skipped() {
        for strict in [false, true] {
            let mut scheduler = LaneScheduler::new(&[4, 2, 1], strict);
            let served = run(&mut scheduler, 20, |_, lane| lane == 2);
            assert!(served.iter().all(|&s| s == Some(2)), "strict {strict}: {served:?}");
            let served = run(&mut scheduler, 20, |_, lane| lane != 1);
            assert_eq!(counts(&served, 3)[1], 0, "strict {strict}: {served:?}");
            assert_eq!(run(&mut scheduler, 3, |_, _| false), [None; 3], "strict {strict}");
        }
    }

    #[test]
    fn the_ready_lanes_share_out_the_picks_by_weight() {
        let mut scheduler = LaneScheduler::new(&[4, 2, 1], false);
        let served = run(&mut scheduler, 30, |_, lane| lane != 0);
        assert_eq!(counts(&served, 3), [0, 20, 10], "{served:?}");
        let mut scheduler = LaneScheduler::new(&[4, 2, 1], false);
        let served = run(&mut scheduler, 3000, |_, lane| lane != 1);
        // Within one delivery of 4:1 (the empty lane's weight still counts
        // in picks it loses).
        let counts = counts(&served, 3);
        assert!(counts[0].abs_diff(2400) <= 3 && counts[2].abs_diff(600) <= 3, "{counts:?}");
    }

    #[test]
    fn an_empty_lane_accrues_no_weight() {
        let mut scheduler = LaneScheduler::new(&[1, 1], false);
        // Lane 1 is empty for a long time, then has work: it gets its fair
        // share from then on, not a burst of saved-up credit.
        run(&mut scheduler, 100, |_, lane| lane == 0);
        let served = run(&mut scheduler, 10, |_, _| true);
        assert_eq!(counts(&served, 2), [5, 5], "{served:?}");
        assert!(served.windows(2).all(|w| w[0] != w[1]), "{served:?}");
    }

    #[test]
    fn strict_always_picks_the_highest_ready_lane() {
        let mut scheduler = LaneScheduler::new(&[1, 2, 1000, 4], true);
        for mask in 1u32..16 {
            let highest = mask.trailing_zeros() as usize;
            let served = run(&mut scheduler, 5, |_, lane| mask & (1 << lane) != 0);
            assert_eq!(served, [Some(highest); 5], "ready lanes {mask:04b}");
        }
    }

    #[test]
    fn weighted_never_starves_a_ready_lane() {
        let weights = [1000, 1, 1000, 1, 1000, 1, 1000, 1];
        let total: u32 = weights.iter().sum();
        let mut scheduler = LaneScheduler::new(&weights, false);
        let served = run(&mut scheduler, total as usize * 3, |_, _| true);
        for window in served.windows(total as usize) {
            let counts = counts(window, weights.len());
            assert!(counts.iter().all(|&n| n >= 1), "a lane starved: {counts:?}");
        }
        let counts = counts(&served, weights.len());
        assert_eq!(counts, weights.map(|w| 3 * w as usize));
    }

    /// Random weights and random ready sets held for a while: each ready
    /// lane's share of the deliveries stays within a few of its weight's
    /// share, whatever the other lanes did before.
    #[test]
    fn ready_lanes_share_by_weight_for_random_weights() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..200 {
            let lanes = 1 + (random() % 8) as usize;
            let weights: Vec<u32> = (0..lanes).map(|_| 1 + (random() % 16) as u32).collect();
            let mut scheduler = LaneScheduler::new(&weights, false);
            for _ in 0..4 {
                let ready = random() | 1 << (random() % lanes as u64);
                let is_ready = |lane: usize| ready & (1 << lane) != 0;
                let total: u32 = (0..lanes).filter(|&l| is_ready(l)).map(|l| weights[l]).sum();
                let picks = 20 * total as usize;
                let served = run(&mut scheduler, picks, |_, lane| is_ready(lane));
                let counts = counts(&served, lanes);
                for lane in 0..lanes {
                    let expected = if is_ready(lane) { 20 * weights[lane] as usize } else { 0 };
                    assert!(
                        counts[lane].abs_diff(expected) <= lanes + 2,
                        "case {case}: weights {weights:?}, ready {ready:b}: {counts:?}"
                    );
                }
            }
        }
    }
}
