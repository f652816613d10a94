"""verify on a network graphcert was not developed on: a PyTorch-exported policy-like MLP (4 inputs, 32-32-32,
ReLU/Tanh/ReLU, random weights) and six box properties just below (holds) or above (violated) the sampled
minimum of an output, in float32 and real arithmetic. `python benchmarks/verify_own_policy.py`"""
import os
import tempfile

import numpy as np
import torch

from graphcert.verify import verify

torch.manual_seed(7)
# A small control-policy-like MLP (4 inputs, 3 hidden layers of 32, Tanh and ReLU mixed), exported by torch.
net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                          torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
d = tempfile.mkdtemp()
model = os.path.join(d, "policy.onnx")
torch.onnx.export(net, torch.zeros(1, 4), model, input_names=["x"], output_names=["y"],
                  dynamic_axes={"x": {0: "batch"}}, dynamo=False)
rng = np.random.default_rng(0)
results = []
for k in range(6):
    c = rng.uniform(-1, 1, 4); w = 0.4
    grid = c + w * rng.uniform(-1, 1, (20000, 4))
    with torch.no_grad():
        y = net(torch.tensor(grid, dtype=torch.float32)).numpy()
    top = int(np.argmax(net(torch.tensor(c[None], dtype=torch.float32)).detach().numpy()))
    lowest = y[:, top].min()
    thr = lowest - 0.003 if k % 2 == 0 else lowest + 0.003   # even: holds if bounds can tell; odd: violated
    spec = os.path.join(d, f"p{k}.vnnlib")
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(4)) + "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))
    text += "".join(f"(assert (>= X_{i} {c[i]-w}))\n(assert (<= X_{i} {c[i]+w}))\n" for i in range(4))
    text += f"(assert (<= Y_{top} {thr}))\n"   # unsafe: the top output at or below the threshold
    open(spec, "w").write(text)
    row = [k, round(float(thr), 4)]
    for rounding in ("float32", "real"):
        r = verify(model, spec, timeout=30, rounding=rounding)
        row += [rounding, r.status, round(r.seconds, 2), r.boxes]
    print(row, flush=True)
