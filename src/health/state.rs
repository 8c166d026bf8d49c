//! The health state machine: pure, no I/O. Probe results in, transitions out.
//!
//! A backend's first result decides its state at once (a backend known to be down at
//! start-up never gets traffic); after that it takes `unhealthy_threshold` consecutive
//! failures to go down and `healthy_threshold` consecutive successes to come back.

/// A state change worth logging and publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// One backend's health as seen by active checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthState {
    healthy: Option<bool>,
    successes: u32,
    failures: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthState {
    /// Not probed yet.
    pub fn new() -> Self {
        HealthState {
            healthy: None,
            successes: 0,
            failures: 0,
        }
    }

    /// Whether the backend is healthy (`None` before the first result).
    pub fn healthy(&self) -> Option<bool> {
        self.healthy
    }

    /// Folds in one probe result; returns the transition it caused, if any.
    pub fn observe(
        &mut self,
        success: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<Transition> {
        if success {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let next = match self.healthy {
            None => success,
            Some(true) => self.failures < unhealthy_threshold.max(1),
            Some(false) => self.successes >= healthy_threshold.max(1),
        };
        let before = self.healthy.replace(next);
        match (before, next) {
            (Some(true), true) | (Some(false), false) => None,
            (_, true) => Some(Transition::Up),
            (_, false) => Some(Transition::Down),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `results` through a fresh state with thresholds healthy = 2, unhealthy = 3 and
    /// returns the transitions.
    fn run(results: &[bool]) -> Vec<Option<Transition>> {
        let mut state = HealthState::new();
        results.iter().map(|&r| state.observe(r, 2, 3)).collect()
    }

    #[test]
    fn table_of_transitions() {
        use Transition::{Down, Up};
        let cases: &[(&[bool], &[Option<Transition>])] = &[
            (&[true], &[Some(Up)]),
            (&[false], &[Some(Down)]),
            (&[true, false, false], &[Some(Up), None, None]),
            (
                &[true, false, false, false],
                &[Some(Up), None, None, Some(Down)],
            ),
            (
                &[true, false, true, false, false],
                &[Some(Up), None, None, None, None],
            ),
            (&[false, true], &[Some(Down), None]),
            (&[false, true, true], &[Some(Down), None, Some(Up)]),
            (
                &[false, true, false, true, true],
                &[Some(Down), None, None, None, Some(Up)],
            ),
            (&[true, true, true], &[Some(Up), None, None]),
        ];
        for (results, expected) in cases {
            assert_eq!(&run(results), expected, "results {results:?}");
        }
    }

    #[test]
    fn thresholds_of_one_flip_immediately() {
        let mut state = HealthState::new();
        assert_eq!(state.observe(true, 1, 1), Some(Transition::Up));
        assert_eq!(state.observe(false, 1, 1), Some(Transition::Down));
        assert_eq!(state.observe(true, 1, 1), Some(Transition::Up));
        assert_eq!(state.healthy(), Some(true));
    }
}
