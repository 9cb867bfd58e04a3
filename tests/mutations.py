"""Swapped-term mutation run (issue 22): each mutant swaps two terms in a method's formula or selection,
and the trained-head formula tests and selection tests must fail on it.

Not collected by pytest (no ``test_`` prefix). Run from the repository root::

    OMP_NUM_THREADS=1 python tests/mutations.py            # all mutants
    OMP_NUM_THREADS=1 python tests/mutations.py tip ldc    # mutants whose id contains one of the words

Every mutant runs on a temporary copy of the repository (``fsl_cache/`` and ``tests/``); the working
tree is never edited. A mutant whose ``old`` text is not found (the code moved) is reported as STALE:
update its triple. Exit status 1 if any mutant survives or is stale.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMULAS, SELECTION = "tests/test_formulas_trained.py", "tests/test_selection.py"

# (id, file, old, new, tests to run): each new text swaps two terms of the old one.
# Left out as equivalent: swapping alpha/beta in TipHead.from_state (the strict load then
# loads the saved alpha/beta buffers over the constructor's values, so the numbers do not change).
MUTANTS: list[tuple[str, str, str, str, str]] = [
    (
        "zero_shot: normalise over the batch instead of the features",
        "fsl_cache/methods/zero_shot.py",
        'F.normalize(x["pooled"], dim=-1)',
        'F.normalize(x["pooled"], dim=0)',
        FORMULAS,
    ),
    (
        "linear_probe: binary coef row on class 0 instead of class 1",
        "fsl_cache/methods/linear_probe.py",
        "np.concatenate([np.zeros_like(coef), coef])",
        "np.concatenate([coef, np.zeros_like(coef)])",
        FORMULAS,
    ),
    (
        "linear_probe: keep the right end's model but record the left C",
        "fsl_cache/methods/linear_probe.py",
        "clf, c_final, left, right = clf_right, right, 10**mid, right",
        "clf, c_final, left, right = clf_left, right, 10**mid, right",
        SELECTION,
    ),
    (
        "tip: alpha and beta swapped in the head's forward",
        "fsl_cache/methods/tip_adapter.py",
        "return clip + cache_logits(affinity, self.values, self.beta) * self.alpha",
        "return clip + cache_logits(affinity, self.values, self.alpha) * self.beta",
        FORMULAS,
    ),
    (
        "tip: exp(-beta(1 - A)) written exp(-beta(A - 1))",
        "fsl_cache/methods/tip_adapter.py",
        "return ((-1) * (beta - beta * affinity)).exp() @ values",
        "return ((-1) * (beta * affinity - beta)).exp() @ values",
        FORMULAS,
    ),
    (
        "tip: searched alpha and beta swapped when set on the head",
        "fsl_cache/methods/tip_adapter.py",
        "head.set_alpha_beta(alpha=alpha, beta=beta)",
        "head.set_alpha_beta(alpha=beta, beta=alpha)",
        SELECTION,
    ),
    (
        "tip: search grids built from each other's scale",
        "fsl_cache/methods/tip_adapter.py",
        "betas, alphas = search_grid(scale[0], steps[0]), search_grid(scale[1], steps[1])",
        "betas, alphas = search_grid(scale[1], steps[0]), search_grid(scale[0], steps[1])",
        SELECTION,
    ),
    (
        "tip: the setter swaps its buffers",
        "fsl_cache/methods/tip_adapter.py",
        "self.alpha.fill_(alpha)\n        self.beta.fill_(beta)",
        "self.alpha.fill_(beta)\n        self.beta.fill_(alpha)",
        FORMULAS,
    ),
    (
        "tip_adapter_f: keys from the raw instead of the normalised feature",
        "fsl_cache/methods/tip_adapter.py",
        "return self.scale * f @ self.text.T, self.adapter(f)",
        "return self.scale * f @ self.text.T, self.adapter(pooled)",
        FORMULAS,
    ),
    (
        "clip_adapter: rho weights the raw feature instead of the adapter output",
        "fsl_cache/methods/clip_adapter.py",
        "return rho * adapted + (1 - rho) * f",
        "return rho * f + (1 - rho) * adapted",
        FORMULAS,
    ),
    (
        "clip_adapter: blend called with adapter output and feature swapped",
        "fsl_cache/methods/clip_adapter.py",
        "blend(self.adapter(f), f, self.rho)",
        "blend(f, self.adapter(f), self.rho)",
        FORMULAS,
    ),
    (
        "clip_adapter: the rho grid keeps the first rho with the best run",
        "fsl_cache/methods/clip_adapter.py",
        "best = (score, rho, result)",
        "best = (score, self.config.rho_grid[0], result)",
        SELECTION,
    ),
    (
        "coop: middle position puts the halves of the context in the other order",
        "fsl_cache/methods/coop.py",
        "parts = [prefix[i : i + 1], ctx[i : i + 1, :half], name, ctx[i : i + 1, half:], rest]",
        "parts = [prefix[i : i + 1], ctx[i : i + 1, half:], name, ctx[i : i + 1, :half], rest]",
        FORMULAS,
    ),
    (
        "coop: front position puts the context before the name",
        "fsl_cache/methods/coop.py",
        "parts = [prefix[i : i + 1], name, ctx[i : i + 1], rest]",
        "parts = [prefix[i : i + 1], ctx[i : i + 1], name, rest]",
        FORMULAS,
    ),
    (
        "ldc: main output fuses ICD with beta and MAF with 1 - beta",
        "fsl_cache/methods/ldc.py",
        '"main": fuse_beta(s_maf, s_icd, self.beta)',
        '"main": fuse_beta(s_icd, s_maf, self.beta)',
        FORMULAS,
    ),
    (
        "ldc: ALF weight on ICD instead of MAF",
        "fsl_cache/methods/ldc_modules.py",
        "return w * s_maf + (1 - w) * s_icd",
        "return w * s_icd + (1 - w) * s_maf",
        FORMULAS,
    ),
    (
        "ldc: WF weights of levels 1 and 4 swapped",
        "fsl_cache/methods/ldc_modules.py",
        "WF_WEIGHTS = (0.1, 0.2, 0.3, 0.4)",
        "WF_WEIGHTS = (0.4, 0.2, 0.3, 0.1)",
        FORMULAS,
    ),
    (
        "ldc: the beta search fuses ICD with beta",
        "fsl_cache/methods/ldc_modules.py",
        "correct = int((fuse_beta(s_maf, s_icd, beta).argmax(dim=-1) == labels).sum())",
        "correct = int((fuse_beta(s_icd, s_maf, beta).argmax(dim=-1) == labels).sum())",
        SELECTION,
    ),
    (
        "ldc: the beta search's result unpacked as (accuracy, beta)",
        "fsl_cache/methods/ldc.py",
        "beta, acc = searched_accuracy(",
        "acc, beta = searched_accuracy(",
        SELECTION,
    ),
    (
        "ldc: loss weights of the two L1 terms swapped",
        "fsl_cache/methods/ldc.py",
        'F.l1_loss(outputs["maf"], zs),\n        F.l1_loss(outputs["icd"], zs),',
        'F.l1_loss(outputs["icd"], zs),\n        F.l1_loss(outputs["maf"], zs),',
        FORMULAS,
    ),
    (
        "ldc_lite/vit: token mean and LayerNorm order swapped",
        "fsl_cache/methods/ldc_modules.py",
        "y = torch.relu(self.norm(self.linear(x)))",
        "y = self.norm(torch.relu(self.linear(x)))",
        FORMULAS,
    ),
    (
        "safe: beta weights the tuned copy instead of the frozen one",
        "fsl_cache/methods/safe.py",
        "return self.beta * self.frozen(dense)[0] + self.tuned(dense)[0]",
        "return self.frozen(dense)[0] + self.beta * self.tuned(dense)[0]",
        FORMULAS,
    ),
    (
        "safe: the record's lr and wd swapped",
        "fsl_cache/methods/safe.py",
        '"lr": points[win][0],\n        "wd": points[win][1],',
        '"lr": points[win][1],\n        "wd": points[win][0],',
        SELECTION,
    ),
    (
        "safe: the head built from the first grid member, not the winner",
        "fsl_cache/methods/safe.py",
        "result, index = members[win]",
        "result, index = members[0]",
        SELECTION,
    ),
    (
        "safe (rn tail): query and key projections swapped",
        "fsl_cache/methods/pooling.py",
        '"wq": pool.q_proj.weight,\n        "bq": pool.q_proj.bias,\n        "wk": pool.k_proj.weight,',
        '"wq": pool.k_proj.weight,\n        "bq": pool.q_proj.bias,\n        "wk": pool.q_proj.weight,',
        FORMULAS,
    ),
    (
        "capt_c: class-level refinement adds commonality minus difference",
        "fsl_cache/methods/capt_modules.py",
        "w = self.text + self.gamma * (self.e_dif.mean(dim=1) - self.e_com.mean(dim=1))",
        "w = self.text + self.gamma * (self.e_com.mean(dim=1) - self.e_dif.mean(dim=1))",
        FORMULAS,
    ),
    (
        "capt_c: global branch on r - f instead of f - r",
        "fsl_cache/methods/capt_modules.py",
        "h_g = self.global_mlp(f_hat - r_bar)",
        "h_g = self.global_mlp(r_bar - f_hat)",
        FORMULAS,
    ),
    (
        "capt_c: sigma(alpha) weights the global branch",
        "fsl_cache/methods/capt_modules.py",
        "return a * h_l + (1 - a) * h_g",
        "return a * h_g + (1 - a) * h_l",
        FORMULAS,
    ),
    (
        "capt_c: semantic expert concatenates g_c before g_d",
        "fsl_cache/methods/capt_modules.py",
        "torch.cat([f_hat, g_d, g_c], dim=-1)",
        "torch.cat([f_hat, g_c, g_d], dim=-1)",
        FORMULAS,
    ),
    (
        "capt_c: reverse confusion cell reads true and pred the other way",
        "fsl_cache/methods/confusion_bank.py",
        "reverse_cell = (pred[None, :] == anchor[:, None]) & sel.gather(1, true[None, :].expand(b, m))",
        "reverse_cell = (true[None, :] == anchor[:, None]) & sel.gather(1, pred[None, :].expand(b, m))",
        FORMULAS,
    ),
    (
        "capt_c: expert and load-balance loss weights swapped",
        "fsl_cache/methods/capt_c.py",
        "loss = loss + cfg.expert_weight * sum(",
        "loss = loss + cfg.lb_weight * sum(",
        FORMULAS,
    ),
    (
        "s210 zs_lp: prototypes normalised over classes instead of features",
        "fsl_cache/methods/zs_lp.py",
        "F.normalize(f, dim=-1) @ F.normalize(prototypes, dim=-1).T * scale",
        "F.normalize(f, dim=-1) @ F.normalize(prototypes, dim=0).T * scale",
        "tests/test_method_zs_lp.py::test_train_probe_is_the_official_loop_on_the_same_shuffles",
    ),
    (
        "s210 clap: zero-shot softmax over the views instead of the classes",
        "fsl_cache/methods/clap.py",
        "torch.softmax(zs_logits.float(), -1).T @ onehot",
        "torch.softmax(zs_logits.float(), 0).T @ onehot",
        "tests/test_method_clap.py",
    ),
    (
        "s210 clap: outer step returns (rho, lambda) swapped",
        "fsl_cache/methods/clap.py",
        "return torch.where(x >= 0, x, torch.zeros_like(h)).clone(), h.clone()",
        "return h.clone(), torch.where(x >= 0, x, torch.zeros_like(h)).clone()",
        "tests/test_method_clap.py::test_outer_step_is_the_official_phr_update",
    ),
    (
        "s210 lp_pp: alpha stepped with the weights' step size",
        "fsl_cache/methods/lp_pp.py",
        "head.alpha -= lr_a * head.alpha.grad",
        "head.alpha -= lr_w * head.alpha.grad",
        "tests/test_method_lp_pp.py::test_the_loop_is_the_official_one_including_the_accumulated_alpha_gradient",
    ),
    (
        "s210 taskres: alpha scales the base instead of the residual",
        "fsl_cache/methods/taskres.py",
        "return base + alpha * residual",
        "return alpha * base + residual",
        "tests/test_method_taskres.py::test_head_is_the_official_residual_and_starts_as_zero_shot",
    ),
    (
        "s210 prolip: the penalty pulls W to zero instead of to W0",
        "fsl_cache/methods/prolip.py",
        "lam * (weight - weight0).pow(2).sum(dim=(1, 2))",
        "lam * weight.pow(2).sum(dim=(1, 2))",
        "tests/test_method_prolip.py::test_loss_and_gradient_are_the_official_ones",
    ),
    (
        "s210 gda: bias adds half the Mahalanobis term instead of subtracting it",
        "fsl_cache/methods/gda.py",
        'math.log(1.0 / len(means)) - torch.einsum("nd,dc,nc->n", means, precision, means) / 2',
        'torch.einsum("nd,dc,nc->n", means, precision, means) / 2 - math.log(1.0 / len(means))',
        "tests/test_method_gda.py::test_precision_weights_and_bias_match_the_official_code",
    ),
    (
        "s210 gda: the head gets the search accuracy instead of alpha",
        "fsl_cache/methods/gda.py",
        "head.alpha.fill_(alpha)",
        "head.alpha.fill_(acc)",
        "tests/test_selection.py::test_gda_uses_the_recorded_alpha",
    ),
    (
        "s210 ape: beta and gamma swapped in the head",
        "fsl_cache/methods/ape.py",
        "ape_cache_logits(affinity, self.values, self.divergence, beta=self.beta, gamma=self.gamma)",
        "ape_cache_logits(affinity, self.values, self.divergence, beta=self.gamma, gamma=self.beta)",
        "tests/test_method_ape.py::test_shot_weights_and_logits_match_the_official_code",
    ),
    (
        "s210 ape: searched alpha and beta swapped when set on the head",
        "fsl_cache/methods/ape.py",
        'for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):',
        'for name, value in (("alpha", beta), ("beta", alpha), ("gamma", gamma)):',
        "tests/test_selection.py::test_ape_uses_the_recorded_beta_alpha_gamma",
    ),
    (
        "s210 ape_t: key residuals taken from the wrong classes",
        "fsl_cache/methods/ape_t.py",
        "keys = self.keys.index_add(1, channels, self.res[self.key_labels])",
        "keys = self.keys.index_add(1, channels, self.res[self.key_labels.flip(0)])",
        "tests/test_method_ape_t.py::test_refined_head_matches_the_official_forward_on_trained_parameters",
    ),
    (
        "s210 ape_t: searched alpha and beta swapped when set on the head",
        "fsl_cache/methods/ape_t.py",
        "head.alpha.fill_(alpha)\n        head.beta.fill_(beta)",
        "head.alpha.fill_(beta)\n        head.beta.fill_(alpha)",
        "tests/test_selection.py::test_ape_t_keeps_the_recorded_epoch_and_beta_alpha",
    ),
]


def copy_repo(dest: Path) -> None:
    for part in ("fsl_cache", "tests"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)


def run_mutant(file: str, old: str, new: str, tests: str) -> str:
    """CAUGHT, SURVIVED or STALE for one mutant, on a fresh temporary copy of the repository."""
    with tempfile.TemporaryDirectory(prefix="fsl-mutant-") as tmp:
        dest = Path(tmp)
        copy_repo(dest)
        path = dest / file
        text = path.read_text()
        if text.count(old) != 1:
            return "STALE"
        path.write_text(text.replace(old, new))
        env = {
            **os.environ,
            "PYTHONPATH": str(dest),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        cmd = [sys.executable, "-m", "pytest", tests, "-x", "-q", "-p", "no:cacheprovider", "--no-header"]
        done = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
        return "SURVIVED" if done.returncode == 0 else "CAUGHT"


def main(words: list[str]) -> int:
    chosen = [m for m in MUTANTS if not words or any(w in m[0] for w in words)]
    results = []
    for ident, file, old, new, tests in chosen:
        verdict = run_mutant(file, old, new, tests)
        results.append(verdict)
        print(f"{verdict:8s} {ident}  [{file}]", flush=True)
    caught = results.count("CAUGHT")
    print(
        f"\n{len(results)} mutants: {caught} caught, {results.count('SURVIVED')} survived, "
        f"{results.count('STALE')} stale"
    )
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
