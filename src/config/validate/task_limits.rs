//! The keys that bound credentials minted per (agent, task): `task_idle`, `max_tasks`,
//! `max_tasks_per_agent` and `mint_rate`. A `github_app` with `mint: per_task` and an `aws`
//! `assume_role` whose `session_name` names `{agent}` or `{task}` take the same four keys with
//! the same defaults and the same checks.

use std::time::Duration;

use super::super::raw::{RawAssumeRole, RawGithubApp, RawMintRate};
use super::super::TaskTokenSettings;
use super::Errors;

const DEFAULT_TASK_IDLE: Duration = Duration::from_secs(600);
const DEFAULT_MAX_TASKS: usize = 256;

/// The four keys as a section wrote them.
pub(super) struct TaskLimitKeys<'a> {
    task_idle: Option<&'a str>,
    max_tasks: Option<usize>,
    max_tasks_per_agent: Option<usize>,
    mint_rate: Option<&'a RawMintRate>,
}

impl<'a> TaskLimitKeys<'a> {
    pub(super) fn of_github_app(raw: &'a RawGithubApp) -> Self {
        TaskLimitKeys {
            task_idle: raw.task_idle.as_deref(),
            max_tasks: raw.max_tasks,
            max_tasks_per_agent: raw.max_tasks_per_agent,
            mint_rate: raw.mint_rate.as_ref(),
        }
    }

    pub(super) fn of_assume_role(raw: &'a RawAssumeRole) -> Self {
        TaskLimitKeys {
            task_idle: raw.task_idle.as_deref(),
            max_tasks: raw.max_tasks,
            max_tasks_per_agent: raw.max_tasks_per_agent,
            mint_rate: raw.mint_rate.as_ref(),
        }
    }

    /// Whether the section set any of them (an error where nothing is minted per task).
    pub(super) fn any_set(&self) -> bool {
        self.task_idle.is_some()
            || self.max_tasks.is_some()
            || self.max_tasks_per_agent.is_some()
            || self.mint_rate.is_some()
    }
}

impl Errors<'_> {
    /// The settings the keys under `at` give, defaults filled in; `None` after pushing an error.
    pub(super) fn task_limits(
        &mut self,
        at: &str,
        keys: &TaskLimitKeys,
    ) -> Option<TaskTokenSettings> {
        let idle = match keys.task_idle {
            None => Some(DEFAULT_TASK_IDLE),
            Some(text) => self
                .duration(&format!("{at}.task_idle"), text)
                .filter(|d| !d.is_zero())
                .or_else(|| {
                    self.push(&format!("{at}.task_idle"), "must be more than zero");
                    None
                }),
        };
        let max_tasks = keys.max_tasks.unwrap_or(DEFAULT_MAX_TASKS);
        if max_tasks == 0 {
            self.push(&format!("{at}.max_tasks"), "must be at least 1");
        }
        let max_per_agent = keys
            .max_tasks_per_agent
            .unwrap_or(TaskTokenSettings::DEFAULT_MAX_PER_AGENT);
        if max_per_agent == 0 {
            self.push(&format!("{at}.max_tasks_per_agent"), "must be at least 1");
        }
        let (mint_per_second, mint_burst) = match keys.mint_rate {
            None => (
                TaskTokenSettings::DEFAULT_MINT_PER_SECOND,
                TaskTokenSettings::DEFAULT_MINT_BURST,
            ),
            Some(rate) => (rate.per_second, rate.burst.unwrap_or(rate.per_second)),
        };
        if mint_per_second == 0 || mint_burst == 0 {
            self.push(
                &format!("{at}.mint_rate"),
                "per_second and burst must be at least 1",
            );
        }
        let valid = max_tasks > 0 && max_per_agent > 0 && mint_per_second > 0 && mint_burst > 0;
        Some(TaskTokenSettings {
            idle: idle?,
            max_tasks,
            max_per_agent,
            mint_per_second,
            mint_burst,
        })
        .filter(|_| valid)
    }
}
