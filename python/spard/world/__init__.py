"""The synthetic safety world: seeded data, a local word-level tokenizer and a tiny Llama aligned
from scratch (cached), so SPARD runs end to end on a CPU in minutes. See docs/world.md."""

from .build import WORLD_VERSION, World, WorldSettings, build_world, make_data, write_data
from .cache import cache_dir
from .moderation import MODERATION_VERSION, build_moderation_model, moderation_judge
from .tokenizer import build_tokenizer

__all__ = ["MODERATION_VERSION", "WORLD_VERSION", "World", "WorldSettings", "build_moderation_model",
           "build_tokenizer", "build_world", "cache_dir", "make_data", "moderation_judge", "write_data"]
