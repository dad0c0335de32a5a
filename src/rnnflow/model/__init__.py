"""The network every variant is (network: embedding, recurrent core, head), its checkpoints,
and the fused CPU recurrence that trains nn.RNN and nn.GRU (fused, recurrence.cpp). May
import core, runtime and data."""
