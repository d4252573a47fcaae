// The access log in the admin console: filters (kept for the export links),
// pages newest first, CSV and JSON export, and the chain's verification said
// plainly.
import { say, t } from "./i18n.js";
import { $, api, fillAccountSelect, momentText, option, showProblem } from "./admin_api.js";

const TIME_ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
// Actions an admin most often looks for; the filter takes any action, or its first part.
// (One string: these are action names, not message keys.)
const KNOWN_ACTIONS = (
  "session.login account account.create account.disable account.reset-totp account.erase " +
  "consult recording support retention practice_settings access_log webhook.delivered"
).split(" ");

let accounts = []; // the practice's, to name actors
let logFilters = {};
let logPages = []; // the "before" of each page shown so far (null: the newest)
let logPage = null; // the latest access-log answer
let lastVerify = null;

export function useAccounts(list) {
  accounts = list;
  fillActorSelect();
}

function fillActorSelect() {
  fillAccountSelect($("log-actor"), accounts, t("admin.log.anyone"));
}

function filtersFromForm() {
  const wanted = { tz: TIME_ZONE };
  const fields = { from: "log-from", to: "log-to", actor: "log-actor", action: "log-action", object: "log-object" };
  for (const [name, id] of Object.entries(fields)) {
    const value = $(id).value.trim();
    if (value) wanted[name] = value;
  }
  return wanted;
}

function updateExportLinks() {
  for (const format of ["csv", "json"]) {
    $(`export-${format}`).href = `/api/admin/access-log/export?${new URLSearchParams({ ...logFilters, format })}`;
  }
}

async function loadLog(before = null) {
  say($("log-error"), "");
  const query = new URLSearchParams(logFilters);
  if (before !== null) query.set("before", String(before));
  try {
    logPage = await api(`/api/admin/access-log?${query}`);
  } catch (error) {
    showProblem($("log-error"), error);
    return false;
  }
  renderLog();
  return true;
}

function actorText(record) {
  const known = accounts.find((account) => account.id === record.actor_id);
  if (known) return known.email;
  const role = t(`admin.actor.${record.actor_role}`, {}, record.actor_role);
  return record.actor_id ? `${role} ${record.actor_id.slice(0, 8)}` : role;
}

function renderLog() {
  if (!logPage) return;
  const rows = $("log-rows");
  rows.replaceChildren();
  for (const record of logPage.records) {
    const row = rows.insertRow();
    row.dataset.seq = record.seq;
    row.insertCell().textContent = momentText(record.at);
    row.insertCell().textContent = actorText(record);
    const action = row.insertCell();
    const code = document.createElement("code");
    code.textContent = record.action;
    action.append(code);
    const object = row.insertCell();
    object.className = "id";
    object.textContent = record.object_id ? `${record.object_type} ${record.object_id}` : record.object_type;
    const outcome = row.insertCell();
    outcome.textContent = t(`admin.outcome.${record.outcome}`, {}, record.outcome);
    outcome.className = `outcome-${record.outcome}`;
  }
  $("log-table").hidden = logPage.records.length === 0;
  $("log-empty").hidden = logPage.records.length > 0;
  $("log-older").disabled = logPage.next_before === null;
  $("log-newest").disabled = logPages.length <= 1;
  say($("log-page-info"), "admin.log.page", { page: logPages.length });
}

async function showLog(event) {
  if (event) event.preventDefault();
  const from = $("log-from").value;
  const to = $("log-to").value;
  if (from && to && from > to) {
    say($("log-error"), "admin.log.badRange");
    return;
  }
  logFilters = filtersFromForm();
  logPages = [null];
  updateExportLinks();
  await loadLog();
}

async function olderPage() {
  if (!logPage || logPage.next_before === null) return;
  const before = logPage.next_before;
  if (await loadLog(before)) logPages.push(before);
  renderLog();
}

async function verifyChain() {
  $("verify").disabled = true;
  $("verify-result").hidden = false;
  $("verify-result").className = "verify-result";
  say($("verify-result"), "admin.verify.running");
  try {
    lastVerify = await api("/api/admin/access-log/verify");
  } catch (error) {
    lastVerify = null;
    showProblem($("verify-result"), error);
    return;
  } finally {
    $("verify").disabled = false;
  }
  renderVerify();
}

function renderVerify() {
  if (!lastVerify) return;
  const box = $("verify-result");
  const { intact, records, broken } = lastVerify;
  const lines = [];
  if (intact) {
    box.className = "verify-result whole";
    lines.push(t("admin.verify.whole", { records }));
  } else {
    box.className = "verify-result broken";
    lines.push(t("admin.verify.broken", { seq: broken.seq, records }));
    lines.push(t(`admin.verify.kind.${broken.kind}`, {}, broken.kind));
    lines.push(t("admin.verify.detail", { detail: broken.detail }));
    lines.push(t("admin.verify.after"));
  }
  say(box, ""); // no longer the "running" message: renderVerify() renders these
  box.replaceChildren(
    ...lines.map((line) => {
      const p = document.createElement("p");
      p.textContent = line;
      return p;
    }),
  );
}

// Shown again in the page's (new) language.
export function renderAccessLog() {
  fillActorSelect();
  renderLog();
  renderVerify();
}

export function wireAccessLog() {
  $("known-actions").replaceChildren(...KNOWN_ACTIONS.map((action) => option(action, action)));
  $("log-filters").addEventListener("submit", showLog);
  $("log-reset").addEventListener("click", () => {
    $("log-filters").reset();
    showLog();
  });
  $("log-older").addEventListener("click", olderPage);
  $("log-newest").addEventListener("click", () => showLog());
  $("verify").addEventListener("click", verifyChain);
}

export async function startAccessLog() {
  logPages = [null];
  logFilters = filtersFromForm();
  updateExportLinks();
  await loadLog();
}
