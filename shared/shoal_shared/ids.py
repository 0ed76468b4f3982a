"""Typed identifiers. Each is a plain string on the wire; NewType keeps them apart in code."""

import re
import secrets
from typing import NewType

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)
RunnerId = NewType("RunnerId", str)
TaskId = NewType("TaskId", str)
CommandId = NewType("CommandId", str)
ModelId = NewType("ModelId", str)

# Ids become NATS subject tokens and JetStream domain names, so they must avoid '.', '*', '>'
# and white space.
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_subject_token(value: str) -> bool:
    return _SUBJECT_TOKEN.fullmatch(value) is not None


def _random_token(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def new_instance_id() -> InstanceId:
    return InstanceId(_random_token("inst"))


def new_runner_id() -> RunnerId:
    return RunnerId(_random_token("runner"))


def new_task_id() -> TaskId:
    return TaskId(_random_token("task"))


def new_command_id() -> CommandId:
    return CommandId(_random_token("cmd"))


def new_node_id() -> NodeId:
    return NodeId(_random_token("node"))
