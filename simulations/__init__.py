"""Many virtual sites on one machine: generated hospitals, simulated runs, the pooled reference."""
