"""Microbenchmarks of minillm-fast's ops against the naive PyTorch reference, peers (Liger-Kernel, torchtune) and
the matmul floor (docs/design.md section 4). Run ``python -m bench --help``; bench/README.md explains the output."""
