"""The learner: OPD/OPD+ maths (pure torch) and the training engine."""
