"""The quiet terminal (pdso_ray.console): what Ray and the workers write goes to the log file, the
package's own lines, its bars and its warnings to the terminal, and everything is restored after."""

from __future__ import annotations

import logging
import os

from pdso_ray.console import quiet_run


def test_quiet_run_sends_the_descriptors_to_the_log_and_the_package_lines_to_the_terminal(tmp_path, capfd):
    log = logging.getLogger("pdso_ray")
    level, handlers = log.level, list(log.handlers)
    log.setLevel(logging.INFO)
    path = tmp_path / "logs" / "run.log"
    try:
        with quiet_run(str(path)) as console:
            os.write(2, b"(MapWorker pid=1) ray chatter\n")  # as Ray's processes write: to the descriptor
            os.write(1, b"worker stdout\n")
            log.info("stage features: running")
            log.warning("3 of 4 clusters hold no image")
            with console.progress(3, "features") as bar:
                bar.update(3)
    finally:
        log.setLevel(level)
    os.write(2, b"after the run\n")
    out, err = capfd.readouterr()
    text = path.read_text()
    assert "ray chatter" in text and "worker stdout" in text
    assert "ray chatter" not in err and "worker stdout" not in out
    assert "stage features: running" in err and "warning: 3 of 4 clusters hold no image" in err
    assert "features: 100%" in err and "3/3" in err
    assert err.rstrip().endswith("after the run")  # descriptor 2 is the terminal again
    assert log.handlers == handlers  # the terminal's handler is gone
