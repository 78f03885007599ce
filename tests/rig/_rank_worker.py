"""One rank of an in-process SGLang load (run by ``tests/rig/inprocess.py``, never directly).

    python tests/rig/_rank_worker.py SPEC.json RANK

Builds SGLang's real model class for this rank the way a scheduler process does
(publish the ServerArgs, MoE flags, gloo process groups, DP-attention state, the
server's own ``build_load_config`` and loader), optionally updates it from disk through
SGLang's real ``WeightUpdater.update_weights_from_disk`` (the method the project forks),
and saves every parameter and persistent buffer with ``torch.save`` for the parent.
stdout/stderr (logging included) go to the log file the parent opened for this rank.

A spec with ``cases`` runs many loads one after the other in this process (imports and
process groups are paid once); each case's result is saved under ``cases`` and its log
lines are fenced by "rig case N begin/end" lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback


def _snapshot(model):
    import torch

    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = p.detach().to("cpu").clone()
    persistent = set(model.state_dict(keep_vars=True).keys())
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in persistent and name not in out and isinstance(b, torch.Tensor):
            out[name] = b.detach().to("cpu").clone()
    return out


def main(spec_path: str, rank: int) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    world = spec["tp_size"]
    out_path = os.path.join(spec["out_dir"], f"rank{rank}.pt")
    logging.basicConfig(
        level=getattr(logging, spec.get("log_level", "INFO")),
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    log = logging.getLogger("tests.rig.rank_worker")
    result = {"rank": rank, "params": None, "params_before": None, "error": None, "update_results": [], "timings": {}}
    t0 = time.perf_counter()
    shown = ("SGLANG_FASTLOAD", "GPU_IMPORT_STANDINS_FOR_TESTS", "TORCHDYNAMO_DISABLE", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")
    log.info(
        "rig rank %d/%d env: %s",
        rank,
        world,
        " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k in shown or k.startswith("SGLANG_RIG_")),
    )

    import torch

    torch.set_num_threads(max(1, int(spec.get("threads_per_rank", 1))))

    cases = spec.get("cases") or [spec]
    first = True
    result["cases"] = []
    for index, case in enumerate(cases):
        case = dict(spec, **case)
        if len(cases) > 1:
            log.info("rig case %d begin: %s (%s)", index, case["model_path"], case["load_format"])
        one = {"params": None, "params_before": None, "error": None, "update_results": [], "timings": {}}
        if "cases" in spec:
            # One case that cannot be built or loaded is reported; the next ones still run.
            try:
                _run_case(case, rank, world, one, log, init_distributed=first)
            except Exception:
                one["crash"] = traceback.format_exc()
                log.error("rig case %d crashed:\n%s", index, one["crash"])
        else:
            _run_case(case, rank, world, one, log, init_distributed=first)
        first = False
        # As a running server would, finish storing a plan this case built (its log line
        # belongs to the case; the worker leaves with os._exit, which waits for nothing).
        from sglang_fastload.loader import plan_store

        plan_store.wait_for_writes()
        if len(cases) > 1:
            log.info("rig case %d end", index)
        result["cases"].append(one)
        import gc

        gc.collect()
    if "cases" not in spec:
        result.update(result.pop("cases")[0])
    result["timings"]["total_s"] = time.perf_counter() - t0
    torch.save(result, out_path + ".tmp")
    os.replace(out_path + ".tmp", out_path)
    # No rank leaves while another may still need the process groups.
    try:
        if world > 1:
            from sglang.srt.distributed import parallel_state

            torch.distributed.barrier(group=parallel_state.get_world_group().cpu_group)
    except Exception:
        log.warning("final barrier failed (results already saved)", exc_info=True)
    return 0


_GROUPS_EP_SIZE = [None]  # the expert-parallel size the current groups were built for


def _run_case(spec: dict, rank: int, world: int, result: dict, log, *, init_distributed: bool) -> None:
    """Load (and update) one model in this process; fills ``result``."""
    import torch

    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import parallel_state
    from sglang.srt.layers.dp_attention import init_dp_gathered_buffer, initialize_dp_attention
    from sglang.srt.layers.moe import initialize_moe_config
    from sglang.srt.model_executor.model_runner_components.load_model_utils import build_load_config
    from sglang.srt.model_loader import get_model_loader
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    timings = result["timings"]
    t0 = time.perf_counter()
    server_kwargs = dict(
        model_path=spec["model_path"],
        device="cpu",
        tp_size=world,
        ep_size=spec["ep_size"],
        dtype="bfloat16",
        load_format=spec["load_format"],
        attention_backend="torch_native",
        sampling_backend="pytorch",
        disable_cuda_graph=True,
        grammar_backend="none",
        disable_overlap_schedule=True,
    )
    if spec.get("extra_config") is not None:
        server_kwargs["model_loader_extra_config"] = json.dumps(spec["extra_config"])
    server_kwargs.update(spec.get("server_args") or {})
    server_args = ServerArgs(**server_kwargs)
    timings["imports_s"] = time.perf_counter() - t0

    from sglang.srt import runtime_context

    # The process groups of an earlier case are stamped into the context; a new case's
    # publish would drop them, so they are carried over, except that a case with another
    # expert-parallel size rebuilds the model-parallel groups (keeping the world group).
    rebuild = not init_distributed and spec["ep_size"] != _GROUPS_EP_SIZE[0]
    groups = {} if init_distributed else dict(runtime_context._CONTEXT.parallel._stamp)
    if rebuild:
        parallel_state.destroy_model_parallel()
        groups = {"world_group": groups["world_group"]}  # the model-parallel groups are rebuilt
    reset_context()
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=rank, gpu_id=rank))
    runtime_context._CONTEXT.parallel._stamp.update(groups)
    _GROUPS_EP_SIZE[0] = spec["ep_size"]
    initialize_moe_config()
    if init_distributed:
        parallel_state.set_custom_all_reduce(False)
        parallel_state.init_distributed_environment(
            backend="gloo",
            world_size=world,
            rank=rank,
            local_rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{spec['port']}",
        )
        parallel_state.initialize_model_parallel()
    elif rebuild:
        parallel_state.initialize_model_parallel()
    model_config = ModelConfig.from_server_args(server_args)
    initialize_dp_attention(server_args=server_args)
    init_dp_gathered_buffer(model_config)
    timings["distributed_s"] = time.perf_counter() - t0 - timings["imports_s"]

    t1 = time.perf_counter()
    load_config = build_load_config(
        server_args=server_args,
        tp_rank=rank,
        remote_instance_weight_transporter_engine=None,
        remote_instance_weight_transporter_session_id="",
        draft_model_idx=None,
        weight_cache_mode="off",
        weight_cache_socket=None,
    )
    loader = get_model_loader(load_config, model_config)
    # Which SGLang ran: the overlay's forks, or upstream's own modules (SGLANG_FASTLOAD=0).
    result["overlay"] = f"{os.sep}_overlay{os.sep}" in (sys.modules["sglang.srt.model_loader.loader"].__file__ or "")
    model = loader.load_model(model_config=model_config, device_config=DeviceConfig("cpu", rank))
    timings["load_s"] = time.perf_counter() - t1
    log.info("initial load (%s) done in %.3f s", spec["load_format"], timings["load_s"])

    updates = spec.get("updates") or []
    if updates:
        from sglang.srt.model_executor.model_runner import ModelRunner
        from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

        if spec.get("keep_initial"):
            result["params_before"] = _snapshot(model)

        class _RunnerFields:
            """The attributes ``ModelRunner.update_model_fields`` reads and writes."""

            is_draft_worker = False

            def __init__(self):
                self.model = model
                self.load_config = load_config
                self.model_config = model_config

            update_model_fields = ModelRunner.update_model_fields

        runner = _RunnerFields()

        def _no_recapture():
            raise AssertionError("recapture_cuda_graph must not run on CPU")

        updater = WeightUpdater(
            tp_rank=rank,
            device="cpu",
            gpu_id=rank,
            model_config=model_config,
            custom_weight_loaders={},
            get_model=lambda: runner.model,
            update_model_fields=runner.update_model_fields,
            recapture_cuda_graph=_no_recapture,
            get_model_runner=lambda: runner,
        )
        timings["update_s"] = []
        for upd in updates:
            t2 = time.perf_counter()
            try:
                ok, message = updater.update_weights_from_disk(upd["model_path"], upd["load_format"])
            except Exception:
                ok, message = False, "exception: " + traceback.format_exc()
            timings["update_s"].append(time.perf_counter() - t2)
            log.info("update to %s (%s): ok=%s message=%s", upd["model_path"], upd["load_format"], ok, message)
            result["update_results"].append((bool(ok), str(message)))
            if spec.get("keep_history"):
                result.setdefault("params_history", []).append(_snapshot(runner.model))
            if not ok and result["error"] is None:
                result["error"] = str(message)
        model = runner.model

    result["params"] = _snapshot(model)
    import module_walk_probe  # beside this script

    if os.environ.get(module_walk_probe.ENV) == "1" and result["overlay"]:  # upstream's own: nothing to probe
        result["module_walks"] = module_walk_probe.probe(model)


if __name__ == "__main__":
    spec_file, rank_arg = sys.argv[1], int(sys.argv[2])
    try:
        code = main(spec_file, rank_arg)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (gloo/atexit hooks can hang or crash after the work is saved).
    os._exit(code)
