// The therapist's recordings on the dashboard: play one in the page (the
// server decrypts the byte ranges the player asks for, nothing is cached),
// download it, or delete it for good. The server sends a page at a time
// (newest first); "Older recordings" adds the next.
import { formatDuration, formatTime, say, t } from "./i18n.js";
import { PagedList } from "./pages.js";

export class RecordingsList {
  constructor({ api, table, empty, older, player, video, caption, close, problem }) {
    Object.assign(this, { api, table, empty, player, video, caption, problem });
    this.pages = new PagedList({
      api,
      path: "/api/recordings",
      field: "recordings",
      older,
      problem,
      render: (recordings) => this.render(recordings),
      focus: table,
    });
    this.playing = null;
    close.addEventListener("click", () => this.close());
    video.addEventListener("error", () => {
      if (this.playing) say(this.problem, "app.recordings.playError");
    });
  }

  // The first page again, and as many more as were shown (a delete or a new
  // consult keeps the therapist's place in the list).
  load() {
    return this.pages.load();
  }

  render(recordings = this.pages.items) {
    this.empty.hidden = recordings.length > 0;
    this.table.hidden = recordings.length === 0;
    const body = this.table.tBodies[0];
    body.replaceChildren();
    for (const recording of recordings) {
      const row = body.insertRow();
      row.dataset.recording = recording.id;
      row.insertCell().textContent = formatTime(recording.created_at, true);
      row.insertCell().textContent =
        recording.duration_s === null ? "" : formatDuration(Math.round(recording.duration_s));
      const status = row.insertCell();
      status.textContent = t(`app.recordings.status.${recording.status}`);
      status.className = `status recording-${recording.status}`;
      const actions = row.insertCell();
      actions.className = "row-actions";
      if (recording.status === "recording") continue;
      const download = document.createElement("a");
      download.className = "button small secondary";
      download.href = `/api/recordings/${recording.id}/download`;
      download.textContent = t("app.recordings.download");
      actions.append(
        this.button("app.recordings.play", () => this.play(recording)),
        download,
        this.button("app.recordings.delete", () => this.remove(recording), "danger"),
      );
    }
  }

  button(key, action, kind = "") {
    const element = document.createElement("button");
    element.type = "button";
    element.className = `small ${kind}`.trim();
    element.textContent = t(key);
    element.addEventListener("click", action);
    return element;
  }

  play(recording) {
    this.playing = recording;
    say(this.problem, "");
    this.caption.textContent = t("app.recordings.playing", {
      time: formatTime(recording.created_at, true),
    });
    this.video.src = `/api/recordings/${recording.id}/media`;
    this.player.hidden = false;
    this.video.focus();
    this.video.play().catch(() => {});
  }

  close() {
    this.playing = null;
    this.video.pause();
    this.video.removeAttribute("src");
    this.video.load();
    this.player.hidden = true;
  }

  async remove(recording) {
    if (!confirm(t("app.recordings.deleteConfirm"))) return;
    if (this.playing && this.playing.id === recording.id) this.close();
    try {
      await this.api("DELETE", `/api/recordings/${recording.id}`);
    } catch (error) {
      say(this.problem, `apiError.${error.code}`, {}, error.fallback || error.message);
    }
    await this.load();
  }
}
