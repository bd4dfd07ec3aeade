"""Two routing calls at 64K flashmoba (the top-k tile from MOBA_TOPK_TILE), for Nsight Compute:

    ncu --kernel-name regex:Topk --launch-skip 1 --launch-count 1 --set full \
        -o topk python3 -m benchmarks.ncu_topk
"""
import torch
from moba_cute.kernels import route_launch as rl

B, H, Hk, D, C, K, S = 2, 16, 16, 128, 128, 8, 65536
torch.manual_seed(0)
q, k, cu = rl._random_inputs(B, H, Hk, D, S, torch.bfloat16)
for _ in range(2):
    rl.route_cute(q, k, cu, cu, S, S, C, K, True)
torch.cuda.synchronize()
