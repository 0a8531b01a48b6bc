"""Model backends for the `ai.*` operations: settings, adapters, guards, cache keys, budget.

Import the modules themselves (`nexus_bus.ai.runtime`, `nexus_bus.ai.openai`...): the
package re-exports only its settings (defined in `nexus_bus.config`).
"""

from nexus_bus.config import AISettings, BackendSettings, BudgetSettings

__all__ = ["AISettings", "BackendSettings", "BudgetSettings"]
