// The support view at /support: the organisation's consults (times, status,
// a pseudonym for the therapist), filters and pages, two charts drawn by the
// server as SVG, and the technical log of one consult for the last 24 hours.
// The filters live in the address, so a reload or a shared link shows the same.
import { language, locale, say, setupLanguage, t, translatePage } from "./i18n.js";
import { showWayHome } from "./roles.js";
import { api, openSession, sessionTouched, stopIdleTimer, wireLogout } from "./session.js";
import { showSection } from "./ui.js";

const $ = (id) => document.getElementById(id);
const STATUSES = [
  ["created", "status.created"],
  ["active", "status.active"],
  ["ended", "status.ended"],
  ["not_started", "status.not_started"],
];
const MAX_CHART_DAYS = 366;
const DAY_MS = 86_400_000;
// The browser's time zone: days in the filters and the per-day chart are its days.
const TIME_ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";

let last = null; // the latest listing answer
let openLog = null; // the latest technical-log answer
let therapists = [];

const show = showSection;

// --- formatting ----------------------------------------------------------------

function localDate(iso) {
  return new Intl.DateTimeFormat(locale(), { day: "numeric", month: "short", year: "numeric" }).format(new Date(iso));
}

function localTime(iso, withSeconds = false) {
  const options = { hour: "2-digit", minute: "2-digit" };
  if (withSeconds) options.second = "2-digit";
  return new Intl.DateTimeFormat(locale(), options).format(new Date(iso));
}

function dayText(day) {
  // A YYYY-MM-DD day, as a date in the page's language (noon: never the day before).
  return localDate(`${day}T12:00:00`);
}

function sameDay(a, b) {
  return new Date(a).toDateString() === new Date(b).toDateString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const hours = Math.floor(seconds / 3600);
  const minutes = Math.floor((seconds % 3600) / 60);
  const rest = String(seconds % 60).padStart(2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${rest}` : `${minutes}:${rest}`;
}

function shortId(id) {
  return id.slice(0, 8);
}

function isoDay(date) {
  const month = String(date.getMonth() + 1).padStart(2, "0");
  const day = String(date.getDate()).padStart(2, "0");
  return `${date.getFullYear()}-${month}-${day}`;
}

function daysBetween(first, lastDay) {
  return Math.round((Date.parse(`${lastDay}T00:00:00Z`) - Date.parse(`${first}T00:00:00Z`)) / DAY_MS) + 1;
}

// --- filters -------------------------------------------------------------------

function filtersFromAddress() {
  const params = new URLSearchParams(location.search);
  const wanted = {};
  for (const name of ["from", "to", "status", "therapist", "page", "per_page"]) {
    if (params.get(name)) wanted[name] = params.get(name);
  }
  return wanted;
}

function filtersFromForm(page = 1) {
  const wanted = { from: $("from").value, to: $("to").value, page: String(page), per_page: $("per-page").value };
  if ($("status").value) wanted.status = $("status").value;
  if ($("therapist").value) wanted.therapist = $("therapist").value;
  return wanted;
}

function fillStatusSelect() {
  const select = $("status");
  const chosen = select.value;
  select.replaceChildren(option("", t("support.filters.allStatuses")));
  for (const [value, key] of STATUSES) select.append(option(value, t(key)));
  select.value = chosen;
}

function fillTherapistSelect(chosen) {
  const select = $("therapist");
  select.replaceChildren(option("", t("support.filters.allTherapists")));
  for (const name of therapists) select.append(option(name, name));
  select.value = therapists.includes(chosen) ? chosen : "";
}

function option(value, text) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  return element;
}

function checkForm() {
  const from = $("from").value;
  const to = $("to").value;
  if (!from || !to) return "support.filters.missing";
  if (from > to) return "support.filters.badRange";
  return "";
}

// --- the list ------------------------------------------------------------------

async function load(wanted) {
  const query = new URLSearchParams({ ...wanted, tz: TIME_ZONE });
  say($("filter-error"), "");
  $("apply").disabled = true;
  let data;
  try {
    data = await api(`/api/support/consults?${query}`);
  } catch (error) {
    if (error.status === 403) show("refused");
    else if (error.status === 422) say($("filter-error"), "support.filters.refused");
    else if (error.status !== 401) say($("filter-error"), error.status ? "common.failed" : "common.offline");
    return;
  } finally {
    $("apply").disabled = false;
  }
  last = data;
  therapists = data.therapists;
  $("from").value = data.filters.from;
  $("to").value = data.filters.to;
  $("status").value = data.filters.status || "";
  $("per-page").value = String(data.per_page);
  fillTherapistSelect(data.filters.therapist);
  const address = new URLSearchParams(shownFilters());
  if (data.page > 1) address.set("page", String(data.page));
  history.replaceState(null, "", `/support?${address}`);
  renderList();
  loadCharts();
}

function renderList() {
  if (!last) return;
  const { consults, total, page, pages, filters } = last;
  const rows = $("rows");
  rows.replaceChildren();
  for (const consult of consults) {
    const row = rows.insertRow();
    row.dataset.consult = consult.id;
    if (openLog && openLog.consult.id === consult.id) row.classList.add("selected");
    const moment = consult.started_at || consult.created_at;
    row.insertCell().textContent = localDate(moment);
    row.insertCell().textContent = consult.started_at ? localTime(consult.started_at) : "—";
    const end = row.insertCell();
    if (consult.ended_at && consult.started_at) {
      end.textContent = sameDay(consult.started_at, consult.ended_at)
        ? localTime(consult.ended_at)
        : `${localDate(consult.ended_at)} ${localTime(consult.ended_at)}`;
    } else {
      end.textContent = "—";
    }
    const length = row.insertCell();
    length.textContent = duration(consult.duration_s);
    length.className = "number";
    const status = row.insertCell();
    status.textContent = t(`status.${consult.status}`);
    status.className = `status status-${consult.status}`;
    if (consult.end_reason) {
      // Known for 24 hours after the end (the technical log's), then not.
      const how = document.createElement("span");
      how.className = "end-reason";
      how.textContent = ` · ${t(`support.ended.${consult.end_reason}`, {}, consult.end_reason)}`;
      status.append(how);
    }
    const therapist = row.insertCell();
    therapist.textContent = consult.therapist || "—";
    therapist.className = "pseudonym";
    const id = row.insertCell();
    id.textContent = shortId(consult.id);
    id.className = "consult-id";
    id.title = consult.id;
    const actions = row.insertCell();
    const button = document.createElement("button");
    button.type = "button";
    button.className = "small secondary";
    button.textContent = t("support.list.log");
    button.setAttribute("aria-label", t("support.list.logLabel", { id: shortId(consult.id) }));
    button.addEventListener("click", () => loadLog(consult.id));
    actions.append(button);
  }
  $("list-empty").hidden = consults.length > 0;
  $("consults").hidden = consults.length === 0;
  const span = { total, from: dayText(filters.from), to: dayText(filters.to) };
  $("summary").textContent = t(total === 1 ? "support.list.summaryOne" : "support.list.summary", span);
  say($("page-info"), "support.pages.info", { page, pages });
  $("previous").disabled = page <= 1;
  $("next").disabled = page >= pages;
}

// The filters of the list on screen (not the form's, which may be half edited).
function shownFilters() {
  const { filters, per_page: perPage } = last;
  const shown = { from: filters.from, to: filters.to };
  if (filters.status) shown.status = filters.status;
  if (filters.therapist) shown.therapist = filters.therapist;
  if (perPage !== 25) shown.per_page = String(perPage);
  return shown;
}

function goToPage(page) {
  if (last) load({ ...shownFilters(), page: String(page) });
}

// --- charts ----------------------------------------------------------------------

function loadCharts() {
  if (!last) return;
  const { filters } = last;
  const problem = $("chart-problem");
  problem.hidden = true;
  const days = daysBetween(filters.from, filters.to);
  const charts = [
    ["chart-per-day", "consults-per-day", "support.charts.perDayAlt"],
    ["chart-durations", "durations", "support.charts.durationsAlt"],
  ];
  if (days > MAX_CHART_DAYS) {
    for (const [id] of charts) $(id).hidden = true;
    say(problem, "support.charts.tooLong", { days: MAX_CHART_DAYS });
    problem.hidden = false;
    return;
  }
  const query = new URLSearchParams({ from: filters.from, to: filters.to, tz: TIME_ZONE, lang: language() });
  if (filters.status) query.set("status", filters.status);
  if (filters.therapist) query.set("therapist", filters.therapist);
  for (const [id, name, altKey] of charts) {
    const image = $(id);
    image.hidden = false;
    image.alt = t(altKey, { from: dayText(filters.from), to: dayText(filters.to) });
    image.src = `/api/support/charts/${name}.svg?${query}`;
  }
}

function chartFailed() {
  say($("chart-problem"), "support.charts.failed");
  $("chart-problem").hidden = false;
}

// --- the technical log -------------------------------------------------------------

async function loadLog(consultId) {
  say($("log-error"), "");
  let data;
  try {
    data = await api(`/api/support/consults/${encodeURIComponent(consultId)}/technical-log`);
  } catch (error) {
    if (error.status === 401) return;
    openLog = null;
    $("technical-log").hidden = false;
    $("log-rows").replaceChildren();
    $("log-table").hidden = true;
    $("log-empty").hidden = true;
    say($("log-consult"), "");
    say($("log-error"), error.status === 404 ? "support.log.notFound" : "common.failed");
    return;
  }
  openLog = data;
  renderLog();
  renderList();
  $("technical-log").hidden = false;
  $("technical-log").scrollIntoView({ block: "start" });
  $("log-heading").focus();
}

function renderLog() {
  if (!openLog) return;
  const { consult, entries, truncated } = openLog;
  const moment = consult.started_at || consult.created_at;
  $("log-consult").textContent = t("support.log.consult", {
    id: consult.id,
    date: `${localDate(moment)} ${localTime(moment)}`,
    status: t(`status.${consult.status}`),
    therapist: consult.therapist || "—",
  });
  const rows = $("log-rows");
  rows.replaceChildren();
  for (const entry of entries) {
    const row = rows.insertRow();
    row.insertCell().textContent = `${localDate(entry.at)} ${localTime(entry.at, true)}`;
    const kind = row.insertCell();
    const code = document.createElement("code");
    code.textContent = entry.kind;
    kind.append(code);
    const detail = row.insertCell();
    detail.className = "detail";
    for (const [key, value] of flatten(entry.detail)) {
      const item = document.createElement("span");
      item.className = "detail-item";
      const name = document.createElement("span");
      name.className = "detail-key";
      name.textContent = `${key}: `;
      item.append(name, String(value));
      detail.append(item);
    }
  }
  $("log-table").hidden = entries.length === 0;
  $("log-empty").hidden = entries.length > 0;
  $("log-truncated").hidden = !truncated;
  say($("log-truncated"), "support.log.truncated", { count: entries.length });
}

// [key, value] pairs of an entry's detail; what a browser reported (under
// detail) reads as the entry's own fields, other nesting as key.inner.
function flatten(detail, prefix = "") {
  const pairs = [];
  for (const [key, value] of Object.entries(detail)) {
    const name = prefix ? `${prefix}.${key}` : key;
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      pairs.push(...flatten(value, key === "detail" && !prefix ? "" : name));
    } else {
      pairs.push([name, Array.isArray(value) ? JSON.stringify(value) : value]);
    }
  }
  return pairs;
}

function closeLog() {
  openLog = null;
  $("technical-log").hidden = true;
  renderList();
}

// --- start -----------------------------------------------------------------------

function wire() {
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const problem = checkForm();
    say($("filter-error"), problem);
    if (!problem) load(filtersFromForm());
  });
  $("reset").addEventListener("click", () => {
    $("status").value = "";
    $("therapist").value = "";
    load({ per_page: $("per-page").value });
  });
  $("per-page").addEventListener("change", () => {
    if (!checkForm()) load(filtersFromForm());
  });
  $("previous").addEventListener("click", () => goToPage(last.page - 1));
  $("next").addEventListener("click", () => goToPage(last.page + 1));
  $("log-close").addEventListener("click", closeLog);
  $("chart-per-day").addEventListener("error", chartFailed);
  $("chart-durations").addEventListener("error", chartFailed);
  wireLogout(stopIdleTimer);
}

async function start() {
  const session = await openSession();
  if (!session) return;
  sessionTouched(session.session.idle_timeout_s);
  if (session.account.role !== "support") {
    showWayHome($("refused-home"), session.account.role);
    show("refused");
    return;
  }
  fillStatusSelect();
  fillTherapistSelect("");
  show("view");
  $("technical-log").hidden = true;
  await load(filtersFromAddress());
}

setupLanguage($("language"), () => {
  translatePage();
  fillStatusSelect();
  fillTherapistSelect($("therapist").value);
  renderList();
  renderLog();
  loadCharts();
});
translatePage();
wire();
start();
