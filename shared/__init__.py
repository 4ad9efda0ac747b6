"""Plumbing shared by the single-file algorithms in `algos/`: models, sampling, log-probs,
verifiers, tasks, run utilities and environments. No algorithm logic lives here."""
