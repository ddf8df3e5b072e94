"""The `small` ninelives MoE in PyTorch eager, for the tokens/s comparison in worker/benches/worker.rs.

Same architecture and shapes as worker/src/model.rs: byte embedding, per layer RMSNorm ->
causal MHA with rotary positions -> RMSNorm -> MoE (softmax router over routed + zero experts,
top-k, SwiGLU routed experts gathered per expert with index_add, identity zero experts, balance
and z losses), final RMSNorm, untied head, AdamW with clipping, gradient accumulation.
Prints `tokens_per_s=<float>`.
"""
import argparse, math, time
import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, required=True)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--global-batch", type=int, default=4)
p.add_argument("--micro-batch", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
L, H, NH, V, R, Z, K, FF, T = 6, 320, 5, 256, 16, 4, 4, 384, 256
HD = H // NH
def P(*s, std=0.02):
    return torch.nn.Parameter(torch.randn(*s) * std)
params = {"embed": P(V, H), "lm_head": P(V, H), "final_norm": torch.nn.Parameter(torch.ones(H))}
for l in range(L):
    for n in ["wq", "wk", "wv", "wo"]:
        params[f"{l}.{n}"] = P(H, H)
    params[f"{l}.attn_norm"] = torch.nn.Parameter(torch.ones(H))
    params[f"{l}.moe_norm"] = torch.nn.Parameter(torch.ones(H))
    params[f"{l}.router"] = P(R + Z, H)
    for e in range(R):
        params[f"{l}.{e}.g"] = P(FF, H); params[f"{l}.{e}.u"] = P(FF, H); params[f"{l}.{e}.d"] = P(H, FF)
opt = torch.optim.AdamW(params.values(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
half = HD // 2
freq = 10000.0 ** (-(2 * torch.arange(half)) / (2 * half))
ang = torch.arange(T)[:, None] * freq[None, :]
cos, sin = ang.cos(), ang.sin()
mask = torch.full((T, T), -1e9).triu(1)
def rms(x, g):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
def rope(x):
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
def forward(tokens, targets):
    b = tokens.shape[0]
    x = params["embed"][tokens.reshape(-1)]
    aux = 0.0
    for l in range(L):
        h = rms(x, params[f"{l}.attn_norm"])
        q, k, v = [(h @ params[f"{l}.{n}"].t()).reshape(b, T, NH, HD).transpose(1, 2) for n in ["wq", "wk", "wv"]]
        q, k = rope(q), rope(k)
        s = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HD) + mask, -1)
        x = x + (s @ v).transpose(1, 2).reshape(b * T, H) @ params[f"{l}.wo"].t()
        h = rms(x, params[f"{l}.moe_norm"])
        logits = h @ params[f"{l}.router"].t()
        probs = torch.softmax(logits, -1)
        top = probs.topk(K, -1).indices
        sel = torch.zeros_like(probs).scatter_(1, top, 1.0)
        gates = probs * sel
        out = torch.zeros_like(h)
        for e in range(R):
            ids = sel[:, e].nonzero().squeeze(1)
            if ids.numel() == 0:
                continue
            xe = h[ids]
            ye = (F.silu(xe @ params[f"{l}.{e}.g"].t()) * (xe @ params[f"{l}.{e}.u"].t())) @ params[f"{l}.{e}.d"].t()
            out = out.index_add(0, ids, ye * gates[ids, e:e + 1])
        out = out + h * gates[:, R:].sum(1, keepdim=True)
        x = x + out
        frac = sel.sum(0) / (h.shape[0] * K)
        aux = aux + 0.01 * (R + Z) * (frac * probs.mean(0)).sum() + 0.001 * torch.logsumexp(logits, -1).pow(2).mean()
    x = rms(x, params["final_norm"])
    return F.cross_entropy(x @ params["lm_head"].t(), targets.reshape(-1)) + aux
def step():
    opt.zero_grad()
    for _ in range(a.global_batch // a.micro_batch):
        tok = torch.randint(0, V, (a.micro_batch, T + 1))
        (forward(tok[:, :-1], tok[:, 1:]) / (a.global_batch // a.micro_batch)).backward()
    torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
    opt.step()
step()  # warm-up
t0 = time.perf_counter()
for _ in range(a.steps):
    step()
dt = time.perf_counter() - t0
print(f"tokens_per_s={a.steps * a.global_batch * T / dt:.1f}")
