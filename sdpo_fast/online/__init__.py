"""Online SDPO: a policy that answers, hears the user's reply and learns from it (the paper's Algorithm 1),
per-user LoRA adapters, simulated users, pairwise judges and the personalization experiments."""
from .adapters import UserAdapters, check_user_id
from .judge import LLMJudge, RuleJudge, WinRate, bootstrap_se, judge_all, judge_pair, summarize, win_rate
from ..model.generation import Sample, generate, sample_batch
from .config import PRESETS, OnlineConfig
from .loop import EmptyGenerationError, OnlinePolicy, run_online
from .personas import RULES, Persona, get_persona, load_personas, parse_personas
from .users import EndpointError, HFChat, LLMUser, OpenAIChat, RuleUser
from .vllm_generator import VLLMGenerator

__all__ = [
    "PRESETS", "RULES", "EmptyGenerationError", "EndpointError", "HFChat", "LLMJudge", "LLMUser", "OnlineConfig",
    "OnlinePolicy", "OpenAIChat", "Persona", "RuleJudge", "RuleUser", "Sample", "UserAdapters", "VLLMGenerator",
    "WinRate", "bootstrap_se", "check_user_id", "generate", "get_persona",
    "judge_all", "judge_pair", "load_personas", "parse_personas", "run_online", "sample_batch", "summarize",
    "win_rate",
]
