// The admin console at /admin: the practice's accounts (create with a one-time
// enrolment link and its QR code, disable and enable, reset the authenticator
// app, change the role, erase), its retention with a dry run of the next purge,
// its own settings, and the access log (filters, pages, export, verification).
// Every rule (the last admin, the four eyes on resets) is the API's; this page
// only says plainly what the API answered.
import { language, setupLanguage, t, translatePage } from "./i18n.js";
import "./i18n_admin.js";
import { showWayHome } from "./roles.js";
import { showAccountNotices, showSection, toLogin } from "./ui.js";

const $ = (id) => document.getElementById(id);
const ROLES = ["therapist", "support", "admin"];
const HOUR_S = 3600;
const VALIDITY_CHOICES_H = [1, 4, 8, 12, 24, 48, 72, 168, 336];
const TIME_ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
// Actions an admin most often looks for; the filter takes any action, or its first part.
// (One string: these are action names, not message keys.)
const KNOWN_ACTIONS = (
  "session.login account account.create account.disable account.reset-totp account.erase " +
  "consult recording support retention practice_settings access_log"
).split(" ");

let me = null;
let idleTimeoutS = 900;
let idleTimer = null;
let accounts = [];
let retention = null;
let lastPreview = null;
let practice = null;
let logFilters = {};
let logPages = []; // the "before" of each page shown so far (null: the newest)
let logPage = null; // the latest access-log answer
let lastVerify = null;
let shownLink = null;

// --- talking to the API ----------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  sessionTouched();
  if (response.status === 401) {
    toLogin("session");
    throw new ApiError(401, "not_logged_in", "not logged in");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new ApiError(response.status, error.code, error.message || "");
  }
  return data;
}

function sessionTouched() {
  clearTimeout(idleTimer);
  idleTimer = setTimeout(() => toLogin("idle"), idleTimeoutS * 1000);
}

// What went wrong, in the page's language; the server's own words (English,
// precise) follow where they name what to fix.
function problem(error) {
  if (!error.status) return t("common.offline");
  if (error.code === "reset_by_operator") return t("admin.error.resetByOperator");
  if (error.status === 409 && /last active admin/.test(error.message)) return t("admin.error.lastAdmin");
  if (error.status === 409) return t("admin.error.emailTaken");
  if (error.status === 404) return t("admin.error.notFound");
  if (error.status === 403) return t("apiError.forbidden");
  if (error.status === 422) return t("admin.error.invalid", { detail: error.message });
  return t("common.failed");
}

// --- formatting ----------------------------------------------------------------------

function locale() {
  const chosen = language();
  const preferred = navigator.languages || [navigator.language || chosen];
  return preferred.find((tag) => tag.toLowerCase().split("-")[0] === chosen) || chosen;
}

function dayText(day) {
  const options = { day: "numeric", month: "short", year: "numeric" };
  return new Intl.DateTimeFormat(locale(), options).format(new Date(`${day}T12:00:00`));
}

function momentText(iso) {
  const options = { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" };
  return new Intl.DateTimeFormat(locale(), options).format(new Date(iso));
}

function hoursText(seconds) {
  const hours = Math.round(seconds / HOUR_S);
  if (hours % 24 === 0 && hours >= 48) return t("admin.practice.days", { days: hours / 24 });
  return t(hours === 1 ? "admin.practice.hour" : "admin.practice.hours", { hours });
}

function option(value, text) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  return element;
}

function button(key, onClick, { danger = false, label = "" } = {}) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = danger ? "small danger" : "small secondary";
  element.textContent = t(key);
  if (label) element.setAttribute("aria-label", label);
  element.addEventListener("click", onClick);
  return element;
}

// --- a confirmation that says what happens ------------------------------------------

function confirmAction({ title, text, items = [], yes }) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-list").replaceChildren(
    ...items.map((item) => {
      const li = document.createElement("li");
      li.textContent = item;
      return li;
    }),
  );
  $("confirm-list").hidden = items.length === 0;
  $("confirm-yes").textContent = yes;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-yes").onclick = null;
      $("confirm-no").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    $("confirm-yes").onclick = () => done(true);
    $("confirm-no").onclick = () => done(false);
    dialog.onclose = () => done(false);
    dialog.showModal();
    $("confirm-no").focus();
  });
}

// --- accounts ----------------------------------------------------------------------------

async function loadAccounts() {
  $("accounts-error").textContent = "";
  try {
    accounts = (await api("/api/admin/accounts")).accounts;
  } catch (error) {
    if (error.status !== 401) $("accounts-error").textContent = problem(error);
    return;
  }
  renderAccounts();
  fillActorSelect();
}

function cell(row, label, text = "") {
  const element = row.insertCell();
  element.dataset.label = label;
  element.textContent = text;
  return element;
}

function renderAccounts() {
  const rows = $("account-rows");
  rows.replaceChildren();
  for (const account of accounts) {
    const row = rows.insertRow();
    row.dataset.account = account.id;
    row.dataset.email = account.email;
    const email = cell(row, t("admin.accounts.email"), account.email);
    const self = me && account.id === me.id;
    if (self) {
      const you = document.createElement("span");
      you.className = "you";
      you.textContent = t("admin.accounts.you");
      email.append(you);
    }
    const role = cell(row, t("admin.accounts.role"));
    if (self) {
      role.textContent = t(`role.${account.role}`);
    } else {
      const select = document.createElement("select");
      select.className = "role-select";
      select.setAttribute("aria-label", t("admin.accounts.roleOf", { email: account.email }));
      for (const name of ROLES) select.append(option(name, t(`role.${name}`)));
      select.value = account.role;
      select.addEventListener("change", () => changeRole(account, select));
      role.append(select);
    }
    const status = cell(row, t("admin.accounts.status"), t(`admin.status.${account.status}`));
    status.className = `status-${account.status}`;
    cell(row, t("admin.accounts.enrolled"), account.enrolled_at ? t("admin.accounts.yes") : t("admin.accounts.no"));
    cell(row, t("admin.accounts.lastLogin"), account.last_login_on ? dayText(account.last_login_on) : t("admin.accounts.never"));
    const actionsCell = row.insertCell();
    if (self) continue;
    const actions = document.createElement("div");
    actions.className = "row-actions";
    actionsCell.append(actions);
    const who = { email: account.email };
    if (account.status === "disabled") {
      actions.append(button("admin.action.enable", () => change(account, "enable"), { label: t("admin.action.enableLabel", who) }));
    } else {
      actions.append(button("admin.action.disable", () => disable(account), { label: t("admin.action.disableLabel", who) }));
    }
    if (account.enrolled_at) {
      actions.append(button("admin.action.resetTotp", () => resetTotp(account), { label: t("admin.action.resetTotpLabel", who) }));
    }
    actions.append(button("admin.action.erase", () => erase(account), { danger: true, label: t("admin.action.eraseLabel", who) }));
  }
}

function replaceAccount(changed) {
  accounts = accounts.map((account) => (account.id === changed.id ? { ...account, ...changed } : account));
  renderAccounts();
}

async function createAccount(event) {
  event.preventDefault();
  const email = $("new-email").value.trim();
  $("create-error").textContent = "";
  if (!email) {
    $("create-error").textContent = t("admin.create.missing");
    return;
  }
  $("create-button").disabled = true;
  try {
    const created = await api("/api/admin/accounts", { method: "POST", body: { email, role: $("new-role").value } });
    $("new-email").value = "";
    showLink(created, "admin.link.created");
    await loadAccounts();
  } catch (error) {
    if (error.status !== 401) $("create-error").textContent = problem(error);
  } finally {
    $("create-button").disabled = false;
  }
}

function showLink(invitation, headingKey) {
  shownLink = { invitation, headingKey };
  renderLink();
  $("copy-status").textContent = "";
  $("link-box").hidden = false;
  $("link-box").scrollIntoView({ block: "nearest" });
  $("link-heading").focus();
}

function renderLink() {
  if (!shownLink) return;
  const { invitation, headingKey } = shownLink;
  $("link-heading").textContent = t(headingKey, { email: invitation.account.email });
  $("link-url").value = invitation.enrolment_url;
  $("link-expires").textContent = t("admin.link.expires", { at: momentText(invitation.enrolment_expires_at) });
  $("link-qr").src = invitation.enrolment_qr;
  $("link-qr").alt = t("admin.link.qrAlt", { email: invitation.account.email });
}

function closeLink() {
  // Gone from the page too: the link is shown once.
  shownLink = null;
  $("link-url").value = "";
  $("link-qr").removeAttribute("src");
  $("link-box").hidden = true;
}

async function copyLink() {
  const url = $("link-url").value;
  try {
    await navigator.clipboard.writeText(url);
  } catch {
    $("link-url").select(); // the clipboard refused: leave it selected for Ctrl+C
    $("copy-status").textContent = t("admin.link.copyByHand");
    return;
  }
  $("copy-status").textContent = t("admin.link.copied");
}

async function change(account, what) {
  $("accounts-error").textContent = "";
  try {
    replaceAccount((await api(`/api/admin/accounts/${account.id}/${what}`, { method: "POST" })).account);
  } catch (error) {
    if (error.status !== 401) $("accounts-error").textContent = problem(error);
  }
}

async function disable(account) {
  const sure = await confirmAction({
    title: t("admin.confirm.disableTitle", { email: account.email }),
    text: t("admin.confirm.disableText"),
    yes: t("admin.action.disable"),
  });
  if (sure) await change(account, "disable");
}

async function resetTotp(account) {
  const sure = await confirmAction({
    title: t("admin.confirm.resetTitle", { email: account.email }),
    text: t("admin.confirm.resetText"),
    yes: t("admin.action.resetTotp"),
  });
  if (!sure) return;
  $("accounts-error").textContent = "";
  try {
    const invitation = await api(`/api/admin/accounts/${account.id}/reset-totp`, { method: "POST" });
    showLink(invitation, "admin.link.reset");
    replaceAccount(invitation.account);
  } catch (error) {
    if (error.status !== 401) $("accounts-error").textContent = problem(error);
  }
}

async function changeRole(account, select) {
  const role = select.value;
  const sure = await confirmAction({
    title: t("admin.confirm.roleTitle", { email: account.email, role: t(`role.${role}`) }),
    text: t("admin.confirm.roleText"),
    yes: t("admin.action.changeRole"),
  });
  if (!sure) {
    select.value = account.role;
    return;
  }
  $("accounts-error").textContent = "";
  try {
    replaceAccount((await api(`/api/admin/accounts/${account.id}`, { method: "PATCH", body: { role } })).account);
  } catch (error) {
    select.value = account.role;
    if (error.status !== 401) $("accounts-error").textContent = problem(error);
  }
}

async function erase(account) {
  const sure = await confirmAction({
    title: t("admin.confirm.eraseTitle", { email: account.email }),
    text: t("admin.confirm.eraseText"),
    items: [
      t("admin.confirm.eraseAccount"),
      t("admin.confirm.eraseSessions"),
      t("admin.confirm.eraseTechnical"),
      t("admin.confirm.eraseConsults"),
      t("admin.confirm.eraseLog"),
    ],
    yes: t("admin.action.eraseForGood"),
  });
  if (!sure) return;
  $("accounts-error").textContent = "";
  try {
    await api(`/api/admin/accounts/${account.id}/erase`, { method: "POST" });
    await loadAccounts();
  } catch (error) {
    if (error.status !== 401) $("accounts-error").textContent = problem(error);
  }
}

// --- retention ------------------------------------------------------------------------------

function retentionForm() {
  return {
    consult_days: Number($("consult-days").value),
    recording_days: Number($("recording-days").value),
    access_log_days: Number($("access-log-days").value),
  };
}

function retentionProblem(days) {
  const ok = Object.values(days).every((value) => Number.isInteger(value) && value >= 1 && value <= 36500);
  return ok ? "" : t("admin.retention.bad");
}

function renderRetention() {
  if (!retention) return;
  $("retention-sentence").textContent = t("admin.retention.sentence", retention);
  renderPreview();
}

async function loadRetention() {
  try {
    retention = await api("/api/admin/retention");
  } catch (error) {
    if (error.status !== 401) $("retention-error").textContent = problem(error);
    return;
  }
  $("consult-days").value = retention.consult_days;
  $("recording-days").value = retention.recording_days;
  $("access-log-days").value = retention.access_log_days;
  renderRetention();
}

async function previewRetention() {
  const days = retentionForm();
  $("retention-error").textContent = retentionProblem(days);
  if ($("retention-error").textContent) return;
  try {
    lastPreview = await api(`/api/admin/retention/preview?${new URLSearchParams(days)}`);
  } catch (error) {
    if (error.status !== 401) $("retention-error").textContent = problem(error);
    return;
  }
  renderPreview();
  $("preview-box").hidden = false;
}

function renderPreview() {
  if (!lastPreview) return;
  const { consults, recordings, access_log_records: records } = lastPreview;
  const saved = retention && Object.entries(lastPreview.retention).every(([key, value]) => retention[key] === value);
  $("preview-text").textContent = t(saved ? "admin.preview.saved" : "admin.preview.proposed", lastPreview.retention);
  $("preview-list").replaceChildren(
    ...[
      t("admin.preview.consults", { count: consults }),
      t("admin.preview.recordings", { count: recordings }),
      t("admin.preview.records", { count: records }),
    ].map((text) => {
      const li = document.createElement("li");
      li.textContent = text;
      return li;
    }),
  );
}

async function saveRetention(event) {
  event.preventDefault();
  const days = retentionForm();
  $("retention-status").textContent = "";
  $("retention-error").textContent = retentionProblem(days);
  if ($("retention-error").textContent) return;
  try {
    retention = await api("/api/admin/retention", { method: "PUT", body: days });
  } catch (error) {
    if (error.status !== 401) $("retention-error").textContent = problem(error);
    return;
  }
  renderRetention();
  $("retention-status").textContent = t("admin.retention.saved");
}

// --- practice settings --------------------------------------------------------------------------

async function loadPractice() {
  try {
    practice = await api("/api/admin/practice-settings");
  } catch (error) {
    if (error.status !== 401) $("practice-error").textContent = problem(error);
    return;
  }
  renderPractice();
}

function renderPractice() {
  if (!practice) return;
  $("recording-allowed").checked = practice.recording_allowed;
  $("recording-off").hidden = practice.server.recording_enabled;
  const select = $("invite-validity");
  const serverS = practice.server.invite_validity_s;
  select.replaceChildren(option("", t("admin.practice.serverValidity", { time: hoursText(serverS) })));
  for (const hours of VALIDITY_CHOICES_H) {
    if (hours * HOUR_S < serverS) select.append(option(String(hours * HOUR_S), hoursText(hours * HOUR_S)));
  }
  const chosen = practice.invite_validity_s;
  if (chosen !== null && ![...select.options].some((item) => item.value === String(chosen))) {
    select.append(option(String(chosen), hoursText(chosen)));
  }
  select.value = chosen === null ? "" : String(chosen);
}

async function savePractice(event) {
  event.preventDefault();
  $("practice-error").textContent = "";
  $("practice-status").textContent = "";
  const validity = $("invite-validity").value;
  const body = {
    recording_allowed: $("recording-allowed").checked,
    invite_validity_s: validity ? Number(validity) : null,
  };
  try {
    practice = await api("/api/admin/practice-settings", { method: "PUT", body });
  } catch (error) {
    if (error.status !== 401) $("practice-error").textContent = problem(error);
    return;
  }
  renderPractice();
  $("practice-status").textContent = t("admin.practice.saved");
}

// --- the access log ----------------------------------------------------------------------------

function fillActorSelect() {
  const select = $("log-actor");
  const chosen = select.value;
  select.replaceChildren(option("", t("admin.log.anyone")));
  for (const account of accounts) select.append(option(account.id, account.email));
  select.value = accounts.some((account) => account.id === chosen) ? chosen : "";
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
  $("log-error").textContent = "";
  const query = new URLSearchParams(logFilters);
  if (before !== null) query.set("before", String(before));
  try {
    logPage = await api(`/api/admin/access-log?${query}`);
  } catch (error) {
    if (error.status !== 401) $("log-error").textContent = problem(error);
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
  $("log-page-info").textContent = t("admin.log.page", { page: logPages.length });
}

async function showLog(event) {
  if (event) event.preventDefault();
  const from = $("log-from").value;
  const to = $("log-to").value;
  if (from && to && from > to) {
    $("log-error").textContent = t("admin.log.badRange");
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
  $("verify-result").textContent = t("admin.verify.running");
  try {
    lastVerify = await api("/api/admin/access-log/verify");
  } catch (error) {
    lastVerify = null;
    if (error.status !== 401) $("verify-result").textContent = problem(error);
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
  box.replaceChildren(
    ...lines.map((line) => {
      const p = document.createElement("p");
      p.textContent = line;
      return p;
    }),
  );
}

// --- start --------------------------------------------------------------------------------------

function fillRoleSelect() {
  const select = $("new-role");
  const chosen = select.value || "therapist";
  select.replaceChildren(...ROLES.map((role) => option(role, t(`role.${role}`))));
  select.value = chosen;
}

function fillActions() {
  $("known-actions").replaceChildren(...KNOWN_ACTIONS.map((action) => option(action, action)));
}

function wire() {
  $("create-form").addEventListener("submit", createAccount);
  $("copy-link").addEventListener("click", copyLink);
  $("close-link").addEventListener("click", closeLink);
  $("retention-form").addEventListener("submit", saveRetention);
  $("retention-preview").addEventListener("click", previewRetention);
  $("practice-form").addEventListener("submit", savePractice);
  $("log-filters").addEventListener("submit", showLog);
  $("log-reset").addEventListener("click", () => {
    $("log-filters").reset();
    showLog();
  });
  $("log-older").addEventListener("click", olderPage);
  $("log-newest").addEventListener("click", () => showLog());
  $("verify").addEventListener("click", verifyChain);
  $("logout").addEventListener("click", async () => {
    clearTimeout(idleTimer);
    await fetch("/api/logout", { method: "POST", credentials: "same-origin" }).catch(() => {});
    location.assign("/login?reason=logout");
  });
}

async function start() {
  let session;
  try {
    const response = await fetch("/api/session", { credentials: "same-origin" });
    if (response.status === 401) {
      toLogin("login");
      return;
    }
    session = await response.json();
  } catch {
    $("loading").querySelector("p").textContent = t("common.offline");
    setTimeout(start, 3000);
    return;
  }
  me = session.account;
  idleTimeoutS = session.session.idle_timeout_s;
  sessionTouched();
  $("who").textContent = me.email;
  showAccountNotices($("account-notices"), session.notices);
  if (me.role !== "admin") {
    showWayHome($("refused-home"), me.role);
    showSection("refused");
    return;
  }
  fillRoleSelect();
  fillActions();
  showSection("view");
  logPages = [null];
  logFilters = filtersFromForm();
  updateExportLinks();
  await loadAccounts();
  await Promise.all([loadRetention(), loadPractice(), loadLog()]);
}

setupLanguage($("language"), () => {
  translatePage();
  fillRoleSelect();
  renderAccounts();
  fillActorSelect();
  renderLink();
  renderRetention();
  renderPractice();
  renderLog();
  renderVerify();
  if (me && me.role !== "admin") showWayHome($("refused-home"), me.role);
});
translatePage();
wire();
start();
