"""Chinchilla's fits of a compute grid (Hoffmann et al. 2022, section 3 and appendix D.2).

Approach 2, isoFLOP profiles: per compute budget C, a parabola in log N through the final losses;
its vertex is N_opt(C), and D_opt(C) is read off the budget's own (log N, log D) line. Straight lines
through (log C, log N_opt) and (log C, log D_opt) give the exponents a and b of N_opt ~ C^a, D_opt ~ C^b,
from the budgets whose vertex lies inside the sizes trained (an extrapolated one is left out).

Approach 3, a parametric loss: L(N, D) = E + A / N^alpha + B / D^beta, written as
log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, and fitted by minimising
the Huber loss (delta 1e-3) of the log-loss residuals with L-BFGS from a grid of starting points, as
the paper does. The bootstrap (runs resampled with replacement) gives percentile intervals. Its
compute-optimal frontier under C = 6ND is N_opt = G (C/6)^a, D_opt = (C/6)^b / G with
a = beta / (alpha + beta), b = alpha / (alpha + beta), G = (alpha A / (beta B))^(1 / (alpha + beta)).

Everything is float64 (numpy for the small least-squares fits, torch.optim.LBFGS for approach 3).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gptlab import GptlabError

# Hoffmann et al. 2022: approach 2 (table 2) and approach 3 (equation 10, table 2)
CHINCHILLA = {"a2": 0.49, "b2": 0.51, "a3": 0.46, "b3": 0.54, "alpha": 0.34, "beta": 0.28, "E": 1.69,
              "A": 406.4, "B": 410.7, "tokens_per_param": 20.0}
HUBER_DELTA = 1e-3
# the paper's grid of initialisations: alpha, beta, e, a, b
START_GRID = {"alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
              "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0, 5, 10, 15, 20, 25), "b": (0, 5, 10, 15, 20, 25)}


# ---- approach 2 -------------------------------------------------------------------------------------

def fit_line(x, y) -> dict:
    """Least squares y = slope x + intercept, with the slope's standard error (None under 3 points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        raise GptlabError("a line needs at least two distinct x values: give at least two budgets")
    slope, intercept = np.polyfit(x, y, 1)
    se = None
    if len(x) > 2:
        resid = y - (slope * x + intercept)
        se = float(math.sqrt(resid @ resid / (len(x) - 2) / ((x - x.mean()) ** 2).sum()))
    return {"slope": float(slope), "intercept": float(intercept), "slope_se": se}


def isoflop_minimum(log_n, loss) -> dict:
    """Vertex of the least-squares parabola loss = c2 x^2 + c1 x + c0 in x = log10 N."""
    x, y = np.asarray(log_n, float), np.asarray(loss, float)
    if len(set(x.tolist())) < 3:
        raise GptlabError("a parabola needs at least three model sizes per budget: give --sizes 3 or more")
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:  # no minimum: the losses fall (or rise) across the whole window
        best = int(np.argmin(y))
        return {"log10_n": float(x[best]), "loss": float(y[best]), "curvature": float(c2), "valid": False,
                "inside": False}
    x_opt = -c1 / (2 * c2)
    return {"log10_n": float(x_opt), "loss": float(c0 - c1 * c1 / (4 * c2)), "curvature": float(c2),
            "valid": True, "inside": bool(x.min() <= x_opt <= x.max())}


def approach2(runs: list[dict]) -> dict:
    """`runs`: dicts with budget, N, tokens, loss. Per-budget optima and the exponents a and b."""
    budgets = sorted({r["budget"] for r in runs})
    optima = []
    for c in budgets:
        rows = [r for r in runs if r["budget"] == c]
        log_n = [math.log10(r["N"]) for r in rows]
        m = isoflop_minimum(log_n, [r["loss"] for r in rows])
        line = fit_line(log_n, [math.log10(r["tokens"]) for r in rows])  # D ~ C / (6N) within a budget
        log_d = line["slope"] * m["log10_n"] + line["intercept"]
        optima.append({"budget": c, "n_opt": 10 ** m["log10_n"], "d_opt": 10 ** log_d, "loss_opt": m["loss"],
                       "tokens_per_param": 10 ** (log_d - m["log10_n"]), "valid": m["valid"],
                       "inside": m["inside"], "curvature": m["curvature"], "sizes": len(rows),
                       "n_range": [min(r["N"] for r in rows), max(r["N"] for r in rows)]})
    used = [o for o in optima if o["inside"]]  # an extrapolated vertex is a guess, not a measurement
    out = {"optima": optima, "a": None, "b": None, "budgets_used": len(used)}
    if len(used) >= 2:
        log_c = [math.log10(o["budget"]) for o in used]
        n_line = fit_line(log_c, [math.log10(o["n_opt"]) for o in used])
        d_line = fit_line(log_c, [math.log10(o["d_opt"]) for o in used])
        out.update(a=n_line["slope"], a_se=n_line["slope_se"], log10_n_coef=n_line["intercept"],
                   b=d_line["slope"], b_se=d_line["slope_se"], log10_d_coef=d_line["intercept"])
    return out


def approach2_optimum(fit2: dict, budget: float) -> tuple[float, float]:
    """(N_opt, D_opt) for `budget` FLOPs from approach 2's lines."""
    if fit2.get("a") is None:
        raise GptlabError("approach 2 has no exponent (fewer than two budgets with a minimum inside their sizes): "
                          "rerun with other budgets or a wider --span")
    x = math.log10(budget)
    return 10 ** (fit2["log10_n_coef"] + fit2["a"] * x), 10 ** (fit2["log10_d_coef"] + fit2["b"] * x)


# ---- approach 3 -------------------------------------------------------------------------------------

def predicted_log_loss(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor) -> torch.Tensor:
    """theta (..., 5) = (a, b, e, alpha, beta) -> log L_hat (..., R) for R runs."""
    a, b, e, alpha, beta = (theta[..., i:i + 1] for i in range(5))  # each (..., 1)
    terms = torch.stack([a - alpha * log_n, b - beta * log_d, e.expand(*e.shape[:-1], log_n.shape[-1])])
    return torch.logsumexp(terms, dim=0)  # (..., R)


def huber_objective(theta, log_n, log_d, log_loss, delta: float = HUBER_DELTA) -> torch.Tensor:
    """Sum of Huber_delta(log L_hat - log L) over runs, in units of delta (same minimiser, saner scale)."""
    r = predicted_log_loss(theta, log_n, log_d) - log_loss
    return (torch.nn.functional.huber_loss(r, torch.zeros_like(r), reduction="none", delta=delta) / delta).sum(-1)


def start_grid() -> torch.Tensor:
    """The paper's 4,500 initialisations as rows (a, b, e, alpha, beta)."""
    g = START_GRID
    mesh = torch.cartesian_prod(*(torch.tensor(g[k], dtype=torch.float64) for k in ("a", "b", "e", "alpha", "beta")))
    return mesh  # (4500, 5)


def value_and_grad(theta, log_n, log_d, log_loss, delta: float = HUBER_DELTA):
    """The objective per row (K,) and its gradient (K, 5), by hand (autograd costs 7x more here):
    d/dr Huber(r)/delta = clamp(r/delta, -1, 1) = psi, and d LSE/du_k = softmax_k(u) = p_k."""
    a, b, e, alpha, beta = (theta[..., i:i + 1] for i in range(5))  # each (K, 1)
    u = torch.stack([a - alpha * log_n, b - beta * log_d, e.expand_as(a - alpha * log_n)])  # (3, K, R)
    lse = torch.logsumexp(u, dim=0)  # (K, R)
    r = lse - log_loss
    value = torch.where(r.abs() <= delta, 0.5 * r * r / delta, r.abs() - 0.5 * delta).sum(-1)
    psi_p = (r / delta).clamp(-1, 1) * torch.softmax(u, dim=0)  # (3, K, R)
    grad = torch.stack([psi_p[0].sum(-1), psi_p[1].sum(-1), psi_p[2].sum(-1),
                        -(psi_p[0] * log_n).sum(-1), -(psi_p[1] * log_d).sum(-1)], dim=-1)
    return value, grad  # (K,), (K, 5)


def _direction(grad, hist_s, hist_y) -> torch.Tensor:
    """L-BFGS two-loop recursion, one quasi-Newton direction per row (K, 5); a row's pairs without
    positive curvature (s.y <= 0, e.g. a failed line search) are left out of its recursion."""
    q, saved = grad.clone(), []
    for s, y in zip(reversed(hist_s), reversed(hist_y)):
        sy = (s * y).sum(-1, keepdim=True)
        rho = torch.where(sy > 1e-12, 1 / sy.clamp_min(1e-12), 0.0)
        a = rho * (s * q).sum(-1, keepdim=True)
        q -= a * y
        saved.append((a, rho, s, y))
    gamma = 1 / grad.norm(dim=-1, keepdim=True).clamp_min(1.0)  # no curvature yet: a first step of length <= 1
    if hist_s:  # the newest pair scales the initial inverse Hessian, as in Nocedal & Wright (7.20)
        sy, yy = (hist_s[-1] * hist_y[-1]).sum(-1, keepdim=True), (hist_y[-1] ** 2).sum(-1, keepdim=True)
        gamma = torch.where(sy > 1e-12, sy / yy.clamp_min(1e-300), gamma)
    q *= gamma
    for a, rho, s, y in reversed(saved):
        b = rho * (y * q).sum(-1, keepdim=True)
        q += s * (a - b)
    return -q


def lbfgs(theta0, log_n, log_d, log_loss, delta: float = HUBER_DELTA, *, iters: int = 400, history: int = 10,
          tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS with a backtracking (Armijo) line search, run on K starting points at once: the rows
    are independent minimisations, vectorised so that thousands of starts cost one. Returns the
    parameters (K, 5) and objectives (K,). torch.optim.LBFGS gives the same minima one start at a time."""
    theta = theta0.clone().to(torch.float64)
    value, grad = value_and_grad(theta, log_n, log_d, log_loss, delta)
    hist_s, hist_y = [], []
    active = value.isfinite()
    for _ in range(iters):
        d = _direction(grad, hist_s, hist_y)
        slope = (grad * d).sum(-1)  # (K,)
        bad = ~(slope < 0) | ~d.isfinite().all(-1)  # no descent direction (stale curvature): steepest descent
        d[bad], slope[bad] = -grad[bad], -(grad[bad] ** 2).sum(-1)
        step = torch.where(active, 1.0, 0.0).to(theta)  # (K,)
        for _ in range(40):  # halve the step of every row whose Armijo condition fails
            trial = torch.where(step[:, None] > 0, theta + step[:, None] * d, theta)
            new_value = huber_objective(trial, log_n, log_d, log_loss, delta)
            fail = ~(new_value <= value + 1e-4 * step * slope) & (step > 0)
            if not fail.any():
                break
            step = torch.where(fail, step / 2, step)
        step = torch.where(fail, 0.0, step)
        new_theta = torch.where(step[:, None] > 0, theta + step[:, None] * d, theta)
        new_value, new_grad = value_and_grad(new_theta, log_n, log_d, log_loss, delta)
        hist_s, hist_y = (hist_s + [new_theta - theta])[-history:], (hist_y + [new_grad - grad])[-history:]
        active &= ((value - new_value).abs() > tol * (1 + value.abs())) & new_value.isfinite()
        theta, value, grad = new_theta, new_value, new_grad
        if not active.any():
            break
    return theta, value


def _params(theta: torch.Tensor) -> dict:
    """theta (log A, log B, log E, alpha, beta) -> the named parameters and the frontier's exponents."""
    log_a, log_b, log_e, alpha, beta = (float(v) for v in theta)
    exp = lambda x: math.exp(x) if x < 709 else math.inf  # noqa: E731 (a degenerate resample can run off)
    out = {"E": exp(log_e), "A": exp(log_a), "B": exp(log_b), "alpha": alpha, "beta": beta}
    if alpha > 0 and beta > 0:
        out["a"], out["b"] = beta / (alpha + beta), alpha / (alpha + beta)
        out["log_G"] = (math.log(alpha) + log_a - math.log(beta) - log_b) / (alpha + beta)
    return out


def approach3(n, d, loss, *, delta: float = HUBER_DELTA, refine: int = 8, bootstrap: int = 0,
              seed: int = 0) -> dict:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta; with `bootstrap` > 0, 95% percentile intervals."""
    n, d, loss = (torch.as_tensor(np.asarray(v, float), dtype=torch.float64) for v in (n, d, loss))
    if len(n) < 5:
        raise GptlabError(f"approach 3 fits 5 parameters: it needs at least 5 runs, got {len(n)}")
    if not bool((n > 0).all() and (d > 0).all() and (loss > 0).all()):
        raise GptlabError("approach 3 needs positive N, D and loss for every run")
    log_n, log_d, log_loss = n.log(), d.log(), loss.log()
    grid = start_grid()
    with torch.no_grad():  # the paper's grid of starts, best first; L-BFGS from the `refine` best
        ranked = grid[torch.argsort(huber_objective(grid, log_n, log_d, log_loss, delta))]  # (4500, 5)
    theta, value = lbfgs(ranked[:refine], log_n, log_d, log_loss, delta)
    theta = theta[int(torch.where(value.isfinite(), value, math.inf).argmin())]
    fit = _params(theta)
    resid = predicted_log_loss(theta, log_n, log_d) - log_loss
    fit["rms_log_residual"] = float(resid.pow(2).mean().sqrt())
    fit["theta"] = [float(v) for v in theta]
    if bootstrap:
        starts = torch.cat([theta[None], ranked[:3]])
        fit["interval"] = _bootstrap(log_n, log_d, log_loss, starts, delta, bootstrap, seed)
        fit["bootstrap"] = bootstrap
    return fit


def _bootstrap(log_n, log_d, log_loss, starts: torch.Tensor, delta, rounds: int, seed: int) -> dict:
    """2.5 and 97.5 percentiles of each parameter over fits to `rounds` resamples of the runs (drawn
    with replacement), each fitted by L-BFGS from `starts` (the full fit and the grid's best points);
    all resamples run together as rows of one vectorised L-BFGS."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(log_n), (rounds, len(log_n)), generator=g)  # (B, R)
    k = len(starts)
    rows = idx.repeat_interleave(k, dim=0)  # (B * k, R): each resample once per start
    theta, value = lbfgs(starts.repeat(rounds, 1), log_n[rows], log_d[rows], log_loss[rows], delta)
    value = torch.where(value.isfinite(), value, math.inf).view(rounds, k)
    best = theta.view(rounds, k, 5)[torch.arange(rounds), value.argmin(-1)]  # (B, 5)
    fits = [_params(t) for t in best]
    keys = [k for k in ("E", "A", "B", "alpha", "beta", "a", "b") if all(k in f for f in fits)]
    return {k: [float(np.percentile([f[k] for f in fits], q, method="nearest")) for q in (2.5, 97.5)] for k in keys}


def loss_at(fit3: dict, n, d):
    """Approach 3's L(N, D) (numpy broadcasting)."""
    return fit3["E"] + fit3["A"] / np.power(n, fit3["alpha"]) + fit3["B"] / np.power(d, fit3["beta"])


def approach3_optimum(fit3: dict, budget: float) -> tuple[float, float]:
    """(N_opt, D_opt) on approach 3's frontier for `budget` FLOPs, counting C = 6ND."""
    if "a" not in fit3:
        raise GptlabError("approach 3 found no frontier (alpha or beta is not positive): the grid is too small "
                          "to fit L(N, D)")
    g = math.exp(fit3["log_G"])
    return g * (budget / 6) ** fit3["a"], (budget / 6) ** fit3["b"] / g


def predict(fit: dict, budget: float) -> dict:
    """The compute-optimal N' and D for `budget` FLOPs from each approach that has a frontier."""
    out = {"budget": budget}
    if fit["approach2"].get("a") is not None:
        n, d = approach2_optimum(fit["approach2"], budget)
        out["approach2"] = {"N": n, "D": d, "tokens_per_param": d / n}
    if "a" in fit.get("approach3", {}):
        n, d = approach3_optimum(fit["approach3"], budget)
        out["approach3"] = {"N": n, "D": d, "tokens_per_param": d / n, "loss": float(loss_at(fit["approach3"], n, d))}
    if len(out) == 1:
        raise GptlabError("the fit has no frontier (too few budgets with a minimum): rerun the grid with more budgets")
    return out
