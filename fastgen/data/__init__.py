"""What the trainer feeds an objective: clean samples, conditions and the unconditional branch.

``build_data(spec, teacher, ..., rank, world_size)`` turns a data spec (an image folder, captioned images, a
prompts file, ``"teacher"``, ``"toy"`` or ``None``) into a ``DataSource``, an endless seeded stream of
``Batch``es whose batch ``k`` on rank ``r`` is a pure function of ``(seed, r, world_size, k)``; the ranks
share one stream order and take disjoint slices of each global batch. One job a module:

- ``fastgen.data.batch``: ``Batch``, ``DataSource`` and the stream contract (order, sharding, ``loader``);
- ``fastgen.data.spec``: the specs, ``check_data`` and the ``build_data`` dispatch;
- ``fastgen.data.images``: image folders, decoding, class sub-folders, the toy world's images;
- ``fastgen.data.captions``: captioned images through Hugging Face ``datasets``;
- ``fastgen.data.prompts``: prompts files and text encoding;
- ``fastgen.data.teacher_pairs``: the teacher's DDIM ODE pairs;
- ``fastgen.data.cache``: cache names (digests, the teacher's fingerprint), atomic safetensors files, the
  null condition.
"""

from fastgen.data.batch import Batch, DataSource
from fastgen.data.cache import flatten_cond, unflatten_cond
from fastgen.data.captions import CAPTION_COLUMNS
from fastgen.data.images import IMAGE_EXTENSIONS, TOY_DATA_SIZE, find_images, image_tensor, load_image
from fastgen.data.prompts import TOY_PROMPTS, read_prompts
from fastgen.data.spec import build_data, check_data

__all__ = ["CAPTION_COLUMNS", "IMAGE_EXTENSIONS", "TOY_DATA_SIZE", "TOY_PROMPTS", "Batch", "DataSource", "build_data",
           "check_data", "find_images", "flatten_cond", "image_tensor", "load_image", "read_prompts", "unflatten_cond"]
