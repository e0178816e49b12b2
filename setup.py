"""Ships nnunet_plugin's start-up hook ``monai_peft_nnunet.pth`` into site-packages (regular and editable installs).

Everything else about the package is declared in setup.cfg. setuptools has no declarative way to put a file at the
wheel root, where a ``.pth`` must be for Python to run it at start-up; the hook appends the plugin's trainer folder to
``nnUNet_extTrainer`` so that ``nnUNetv2_train ... -tr nnUNetTrainerConvAdapter`` works right after ``pip install``
(docs/nnunet.md). If a future setuptools changes the editable-install internals used below, the install still
succeeds without the hook and ``eval "$(python -m nnunet_plugin --export)"`` is the documented fallback.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "monai_peft_nnunet.pth"
PTH_SOURCE = os.path.join("nnunet_plugin", PTH)


class build_py_with_pth(build_py):
    """Regular wheels: copy the hook to the wheel root (= site-packages)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return [*outputs, os.path.join(self.build_lib, PTH)]


cmdclass = {"build_py": build_py_with_pth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64 has no PEP 660 editable installs
    editable_wheel = None

if editable_wheel is not None and hasattr(editable_wheel, "_run_build_commands"):

    class editable_wheel_with_pth(editable_wheel):
        """``pip install -e``: put the hook beside setuptools' own ``__editable__`` .pth file."""

        def _run_build_commands(self, dist_name, unpacked_wheel, *args, **kwargs):
            result = super()._run_build_commands(dist_name, unpacked_wheel, *args, **kwargs)
            shutil.copyfile(os.path.join(self.project_dir or ".", PTH_SOURCE), os.path.join(unpacked_wheel, PTH))
            return result

    cmdclass["editable_wheel"] = editable_wheel_with_pth

setup(cmdclass=cmdclass)
