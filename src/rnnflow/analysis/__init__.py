"""What the models did: test-set evaluation, gradient flow through time, the leaderboard
(compare) and the memory-horizon report (longrange). May import core, runtime, tracking, data
and model."""
