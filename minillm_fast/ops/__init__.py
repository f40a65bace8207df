"""Public ops: one file per op family (autograd Function, torch.library registration, public function)."""
