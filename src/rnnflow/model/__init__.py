"""The network every variant is (network: embedding, recurrent core, head) and its
checkpoints. May import core, runtime and data."""
