"""The network every variant is (network: embedding, recurrent core, head), its checkpoints,
and the fused CPU training kernels (fused, recurrence.cpp: the recurrences of nn.RNN and
nn.GRU, max pooling, dropout masks). May import core, runtime and data."""
