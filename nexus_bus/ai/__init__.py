"""Model backends for the `ai.*` operations: settings, adapters, guards, cache keys, budget.

Import the modules themselves (`nexus_bus.ai.runtime`, `nexus_bus.ai.openai`...): this
package is imported by `nexus_bus.config` for its settings, so it re-exports nothing heavy.
"""

from nexus_bus.ai.settings import AISettings, BackendSettings, BudgetSettings

__all__ = ["AISettings", "BackendSettings", "BudgetSettings"]
