"""How a stage runs: seeds, threads and device (host), the stage command lines (stagecli),
the warm stage server (stageserver) and each stage's timeline. May import core."""
