"""Run by tests/test_sharding.py: one process of a (possibly multi-process) CPU training run.

    python multiprocess_run.py WORKDIR NUM_PROCESSES PROCESS_ID PORT DEVICES_PER_PROCESS

With NUM_PROCESSES > 1 the processes find each other through jax.distributed on localhost and
exchange gradients with the CPU collectives backend (gloo), as hosts of a cluster would.
"""

import json
import sys

import jax


def main():
    workdir, num_processes, process_id, port, local_devices = sys.argv[1:]
    num_processes, process_id, local_devices = (
        int(num_processes),
        int(process_id),
        int(local_devices),
    )
    jax.config.update("jax_num_cpu_devices", local_devices)
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from conftest import load_config, small

    from jaxdp import run as run_lib
    from jaxdp.config import to_settings

    cfg = small(load_config("tiny_offline"), num_steps=2)
    cfg.dp.microbatch_size = 2  # per device: 8 examples per chunk on 4 devices
    cfg.dp.noise_seed = 3  # the one- and two-process runs must draw the same noise and batches
    if num_processes > 1:
        cfg.distributed.coordinator_address = f"127.0.0.1:{port}"
        cfg.distributed.num_processes = num_processes
        cfg.distributed.process_id = process_id
    summary = run_lib.run(to_settings(cfg), workdir)
    assert jax.device_count() == 4, jax.devices()
    if jax.process_index() == 0:
        print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
