// The admin console's billing export: a month (last month unless chosen) in
// the browser's time zone, all therapists or one, shown as each therapist's
// totals and a row a consult, and the same to download: as a CSV for Excel
// (semicolons, a byte-order mark, ids as text; docs/admin.md), a plain CSV
// for programs, or JSON. The table is asked for only when the admin says
// "Show": each export is a read of the practice's consults, and so a record
// in the access log.
import { locale, say, t } from "./i18n.js";
import "./i18n_admin_integrations.js";
import { $, api, fillAccountSelect, showProblem } from "./admin_api.js";

const PATH = "/api/admin/billing";
const TIME_ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
const MONTH = /^[0-9]{4}-(0[1-9]|1[0-2])$/;

let therapists = [];
let shown = null; // the latest answer

function monthValue(date) {
  return `${date.getFullYear()}-${String(date.getMonth() + 1).padStart(2, "0")}`;
}

function lastMonth() {
  const now = new Date();
  return monthValue(new Date(now.getFullYear(), now.getMonth() - 1, 1));
}

// What the form asks for, as the API's query (without the format).
function wanted() {
  const query = { month: $("billing-month").value.trim(), tz: TIME_ZONE };
  const therapist = $("billing-therapist").value;
  if (therapist) query.therapist = therapist;
  return query;
}

// Each format's file name ends as the server names it.
const FILE_ENDINGS = { excel: "-excel.csv", csv: ".csv", json: ".json" };

function updateDownloadLinks() {
  const query = wanted();
  for (const [format, ending] of Object.entries(FILE_ENDINGS)) {
    const link = $(`billing-${format}`);
    link.href = `${PATH}?${new URLSearchParams({ ...query, format })}`;
    link.download = `consults-${query.month}${ending}`;
  }
}

export function useBillingAccounts(accounts) {
  therapists = accounts.filter((account) => account.role === "therapist");
  fillTherapistSelect();
}

function fillTherapistSelect() {
  fillAccountSelect($("billing-therapist"), therapists, t("admin.billing.everyone"));
}

// --- formatting ---------------------------------------------------------------------

// h:mm:ss, as a spreadsheet reads a duration.
function durationText(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const two = (value) => String(value).padStart(2, "0");
  return `${Math.floor(seconds / 3600)}:${two(Math.floor(seconds / 60) % 60)}:${two(seconds % 60)}`;
}

function timeText(iso) {
  if (!iso) return "";
  return new Intl.DateTimeFormat(locale(), { hour: "2-digit", minute: "2-digit" }).format(new Date(iso));
}

function dayOf(iso) {
  const options = { weekday: "short", day: "numeric", month: "short" };
  return new Intl.DateTimeFormat(locale(), options).format(new Date(`${iso}T12:00:00`));
}

function scheduledText(iso) {
  if (!iso) return "";
  const options = { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" };
  return new Intl.DateTimeFormat(locale(), options).format(new Date(iso));
}

function fillRow(row, cells) {
  for (const [label, text, className] of cells) {
    const cell = row.insertCell();
    cell.dataset.label = t(label);
    cell.textContent = text;
    if (className) cell.className = className;
  }
}

// --- the month ----------------------------------------------------------------------

async function showMonth(event) {
  if (event) event.preventDefault();
  say($("billing-error"), "");
  const query = wanted();
  if (!MONTH.test(query.month)) {
    say($("billing-error"), "admin.billing.badMonth");
    return;
  }
  updateDownloadLinks();
  try {
    shown = await api(`${PATH}?${new URLSearchParams(query)}`);
  } catch (error) {
    showProblem($("billing-error"), error);
    return;
  }
  renderBilling();
}

export function renderBilling() {
  fillTherapistSelect();
  say($("billing-zone"), "admin.billing.zone", { zone: TIME_ZONE });
  if (!shown) return;
  const totals = $("billing-total-rows");
  totals.replaceChildren();
  for (const total of shown.therapists) {
    const row = totals.insertRow();
    row.dataset.therapist = total.therapist_id;
    fillRow(row, [
      ["admin.billing.col.therapist", total.therapist],
      ["admin.billing.col.count", String(total.consults), "number"],
      ["admin.billing.col.held", String(total.held), "number"],
      ["admin.billing.col.total", durationText(total.duration_s), "number"],
    ]);
  }
  const rows = $("billing-rows");
  rows.replaceChildren();
  for (const consult of shown.consults) {
    const row = rows.insertRow();
    row.dataset.consult = consult.consult_id;
    fillRow(row, [
      ["admin.billing.col.therapist", consult.therapist],
      ["admin.billing.col.date", dayOf(consult.date)],
      ["admin.billing.col.scheduled", scheduledText(consult.scheduled_at)],
      ["admin.billing.col.start", timeText(consult.started_at)],
      ["admin.billing.col.end", timeText(consult.ended_at)],
      ["admin.billing.col.duration", durationText(consult.duration_s), "number"],
      ["admin.billing.col.status", t(`status.${consult.status}`, {}, consult.status)],
    ]);
  }
  const any = shown.consults.length > 0;
  $("billing-result").hidden = !any;
  $("billing-empty").hidden = any;
}

export function wireBilling() {
  const month = $("billing-month");
  month.value = lastMonth();
  month.max = monthValue(new Date());
  $("billing-form").addEventListener("submit", showMonth);
  for (const field of [month, $("billing-therapist")]) field.addEventListener("change", updateDownloadLinks);
  updateDownloadLinks();
  renderBilling();
}
