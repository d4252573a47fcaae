// The admin console at /admin: the practice's accounts (create with a one-time
// enrolment link and its QR code, disable and enable, reset the authenticator
// app, change the role, erase), its retention with a dry run of the next purge,
// its own settings, its webhooks (admin_webhooks.js), the billing export
// (admin_billing.js) and the access log (filters, pages, export, verification).
// Every rule (the last admin, the four eyes on resets) is the API's; this page
// only says plainly what the API answered.
import { say, setupLanguage, t, translatePage } from "./i18n.js";
import "./i18n_admin.js";
import {
  $,
  api,
  button,
  confirmAction,
  copyShown,
  dayText,
  momentText,
  option,
  showProblem,
  sessionTouched,
  stopIdleTimer,
} from "./admin_api.js";
import { renderBilling, useBillingAccounts, wireBilling } from "./admin_billing.js";
import { fillExternalIdCell, wireExternalId } from "./admin_external_id.js";
import { renderAccessLog, startAccessLog, useAccounts, wireAccessLog } from "./admin_log.js";
import { renderWebhooks, startWebhooks, wireWebhooks } from "./admin_webhooks.js";
import { showWayHome } from "./roles.js";
import { openSession, wireLogout } from "./session.js";
import { showSection } from "./ui.js";

const ROLES = ["therapist", "support", "admin"];
const HOUR_S = 3600;
const VALIDITY_CHOICES_H = [1, 4, 8, 12, 24, 48, 72, 168, 336];

let me = null;
let accounts = [];
let retention = null;
let lastPreview = null;
let practice = null;
let shownLink = null;

// --- small helpers ----------------------------------------------------------------

function hoursText(seconds) {
  const hours = Math.round(seconds / HOUR_S);
  if (hours % 24 === 0 && hours >= 48) return t("admin.practice.days", { days: hours / 24 });
  return t(hours === 1 ? "admin.practice.hour" : "admin.practice.hours", { hours });
}

// --- accounts ----------------------------------------------------------------------------

async function loadAccounts() {
  say($("accounts-error"), "");
  try {
    accounts = (await api("/api/admin/accounts")).accounts;
  } catch (error) {
    showProblem($("accounts-error"), error);
    return;
  }
  renderAccounts();
  useAccounts(accounts);
  useBillingAccounts(accounts);
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
    fillExternalIdCell(cell(row, t("admin.accounts.externalId")), account, { editable: !self });
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
  say($("create-error"), "");
  if (!email) {
    say($("create-error"), "admin.create.missing");
    return;
  }
  $("create-button").disabled = true;
  try {
    const created = await api("/api/admin/accounts", { method: "POST", body: { email, role: $("new-role").value } });
    $("new-email").value = "";
    showLink(created, "admin.link.created");
    await loadAccounts();
  } catch (error) {
    showProblem($("create-error"), error);
  } finally {
    $("create-button").disabled = false;
  }
}

function showLink(invitation, headingKey) {
  shownLink = { invitation, headingKey };
  renderLink();
  say($("copy-status"), "");
  $("link-box").hidden = false;
  $("link-box").scrollIntoView({ block: "nearest" });
  $("link-heading").focus();
}

function renderLink() {
  if (!shownLink) return;
  const { invitation, headingKey } = shownLink;
  say($("link-heading"), headingKey, { email: invitation.account.email });
  $("link-url").value = invitation.enrolment_url;
  say($("link-expires"), "admin.link.expires", { at: momentText(invitation.enrolment_expires_at) });
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

function copyLink() {
  return copyShown($("link-url"), $("copy-status"), {
    copied: "admin.link.copied",
    byHand: "admin.link.copyByHand",
  });
}

async function change(account, what) {
  say($("accounts-error"), "");
  try {
    replaceAccount((await api(`/api/admin/accounts/${account.id}/${what}`, { method: "POST" })).account);
  } catch (error) {
    showProblem($("accounts-error"), error);
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
  say($("accounts-error"), "");
  try {
    const invitation = await api(`/api/admin/accounts/${account.id}/reset-totp`, { method: "POST" });
    showLink(invitation, "admin.link.reset");
    replaceAccount(invitation.account);
  } catch (error) {
    showProblem($("accounts-error"), error);
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
  say($("accounts-error"), "");
  try {
    replaceAccount((await api(`/api/admin/accounts/${account.id}`, { method: "PATCH", body: { role } })).account);
  } catch (error) {
    select.value = account.role;
    showProblem($("accounts-error"), error);
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
  say($("accounts-error"), "");
  try {
    await api(`/api/admin/accounts/${account.id}/erase`, { method: "POST" });
    await loadAccounts();
  } catch (error) {
    showProblem($("accounts-error"), error);
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
  return ok ? "" : "admin.retention.bad";
}

function renderRetention() {
  if (!retention) return;
  say($("retention-sentence"), "admin.retention.sentence", retention);
  renderPreview();
}

async function loadRetention() {
  try {
    retention = await api("/api/admin/retention");
  } catch (error) {
    showProblem($("retention-error"), error);
    return;
  }
  $("consult-days").value = retention.consult_days;
  $("recording-days").value = retention.recording_days;
  $("access-log-days").value = retention.access_log_days;
  renderRetention();
}

async function previewRetention() {
  const days = retentionForm();
  const bad = retentionProblem(days);
  say($("retention-error"), bad);
  if (bad) return;
  try {
    lastPreview = await api(`/api/admin/retention/preview?${new URLSearchParams(days)}`);
  } catch (error) {
    showProblem($("retention-error"), error);
    return;
  }
  renderPreview();
  $("preview-box").hidden = false;
}

function renderPreview() {
  if (!lastPreview) return;
  const { consults, recordings, access_log_records: records } = lastPreview;
  const saved = retention && Object.entries(lastPreview.retention).every(([key, value]) => retention[key] === value);
  say($("preview-text"), saved ? "admin.preview.saved" : "admin.preview.proposed", lastPreview.retention);
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
  say($("retention-status"), "");
  const bad = retentionProblem(days);
  say($("retention-error"), bad);
  if (bad) return;
  try {
    retention = await api("/api/admin/retention", { method: "PUT", body: days });
  } catch (error) {
    showProblem($("retention-error"), error);
    return;
  }
  renderRetention();
  say($("retention-status"), "admin.retention.saved");
}

// --- practice settings --------------------------------------------------------------------------

async function loadPractice() {
  try {
    practice = await api("/api/admin/practice-settings");
  } catch (error) {
    showProblem($("practice-error"), error);
    return;
  }
  renderPractice();
}

function renderPractice() {
  if (!practice) return;
  $("recording-allowed").checked = practice.recording_allowed;
  $("references-allowed").checked = practice.appointment_reference_allowed;
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
  say($("practice-error"), "");
  say($("practice-status"), "");
  const validity = $("invite-validity").value;
  const body = {
    recording_allowed: $("recording-allowed").checked,
    appointment_reference_allowed: $("references-allowed").checked,
    invite_validity_s: validity ? Number(validity) : null,
  };
  try {
    practice = await api("/api/admin/practice-settings", { method: "PUT", body });
  } catch (error) {
    showProblem($("practice-error"), error);
    return;
  }
  renderPractice();
  say($("practice-status"), "admin.practice.saved");
}

// --- start --------------------------------------------------------------------------------------

function fillRoleSelect() {
  const select = $("new-role");
  const chosen = select.value || "therapist";
  select.replaceChildren(...ROLES.map((role) => option(role, t(`role.${role}`))));
  select.value = chosen;
}

function wire() {
  $("create-form").addEventListener("submit", createAccount);
  $("copy-link").addEventListener("click", copyLink);
  $("close-link").addEventListener("click", closeLink);
  $("retention-form").addEventListener("submit", saveRetention);
  $("retention-preview").addEventListener("click", previewRetention);
  $("practice-form").addEventListener("submit", savePractice);
  wireExternalId(replaceAccount);
  wireWebhooks();
  wireBilling();
  wireAccessLog();
  wireLogout(stopIdleTimer);
}

async function start() {
  const session = await openSession();
  if (!session) return;
  me = session.account;
  sessionTouched(session.session.idle_timeout_s);
  if (me.role !== "admin") {
    showWayHome($("refused-home"), me.role);
    showSection("refused");
    return;
  }
  fillRoleSelect();
  showSection("view");
  await loadAccounts();
  await Promise.all([loadRetention(), loadPractice(), startWebhooks(), startAccessLog()]);
}

setupLanguage($("language"), () => {
  translatePage();
  fillRoleSelect();
  renderAccounts();
  renderLink();
  renderRetention();
  renderPractice();
  renderWebhooks();
  renderBilling();
  renderAccessLog();
});
translatePage();
wire();
start();
